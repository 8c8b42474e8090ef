"""What the device lab tests share: run a scenario of devtools/lab_vm.py in the lab and
read back its JSON; the ``volt`` command of this environment.

A guest that hangs (lab_vm.py kills it at its timeout) is run once more, with a
:class:`LabHangWarning`, as lab.run does for a wedged L1: on a loaded CI host an L2 guest
of the emulated L1 occasionally stops making progress (once seen in CI: the balloon
guest, 37 s of work, silent for 300 s after a kernel stack report from its idle CPU;
not reproduced in runs alone). A guest that hangs twice is the test's failure."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LAB_VM = Path(__file__).with_name("lab_vm.py")
VOLT = str(Path(sys.executable).with_name("volt"))


class LabHangWarning(UserWarning):
    """A lab guest hung and was run again."""


def lab_scenario(lab: Any, scenario: str, args: dict, *, timeout: float = 300,
                 writable: Sequence[Path] = (), memory_mib: int = 2048) -> dict:
    """Run ``scenario`` in the lab; its JSON result, with ``console`` as one string."""
    def once() -> dict:
        res = lab.run([sys.executable, str(LAB_VM), scenario, json.dumps(args)],
                      timeout=timeout + 120, writable=writable, memory_mib=memory_mib)
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
        out = json.loads(res.stdout.strip().splitlines()[-1])
        out["console"] = "\n".join(text for _, text in out["lines"])
        return out

    out = once()
    if out["console"].endswith("LAB-VM-TIMEOUT"):
        warnings.warn(f"the {scenario} guest hung until killed; running it again. Its "
                      f"console ended:\n{out['console'][-1500:]}", LabHangWarning, stacklevel=2)
        out = once()
    return out


def marker_time(result: dict, prefix: str) -> float | None:
    """L1's time of the first console line starting with ``prefix``."""
    return next((t for t, text in result["lines"] if text.startswith(prefix)), None)
