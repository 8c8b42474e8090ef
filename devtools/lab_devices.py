"""What the device lab tests share: run a scenario of devtools/lab_vm.py in the lab and
read back its JSON; the ``volt`` command of this environment."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LAB_VM = Path(__file__).with_name("lab_vm.py")
VOLT = str(Path(sys.executable).with_name("volt"))


def lab_scenario(lab: Any, scenario: str, args: dict, *, timeout: float = 300,
                 writable: Sequence[Path] = (), memory_mib: int = 2048) -> dict:
    """Run ``scenario`` in the lab; its JSON result, with ``console`` as one string."""
    res = lab.run([sys.executable, str(LAB_VM), scenario, json.dumps(args)],
                  timeout=timeout + 120, writable=writable, memory_mib=memory_mib)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["console"] = "\n".join(text for _, text in out["lines"])
    return out


def marker_time(result: dict, prefix: str) -> float | None:
    """L1's time of the first console line starting with ``prefix``."""
    return next((t for t, text in result["lines"] if text.startswith(prefix)), None)
