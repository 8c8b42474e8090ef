"""Real Linux under Volt inside the nested KVM lab: one lab session, four guest boots.

bzImage (64-bit boot protocol) and vmlinux (PVH) each boot to the smoke init's
marker with 2 vCPUs; then a guest that powers off, and one that is paused,
resumed and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
from volt.kernels.initramfs import SMOKE_MARKER, base_archive

HERE = Path(__file__).parent

POWEROFF_INIT = """#!/bin/busybox sh
/bin/busybox echo VOLT-POWEROFF
/bin/busybox poweroff -f
"""
TICKER_INIT = """#!/bin/busybox sh
i=0
while true; do i=$((i+1)); /bin/busybox echo "tick $i"; /bin/busybox sleep 1; done
"""


@pytest.mark.lab
@pytest.mark.slow
def test_linux_boots_and_lifecycle_in_lab(lab, guest_kernel, smoke_initramfs, tmp_path):
    volt = str(Path(sys.executable).with_name("volt"))
    common = ["--initrd", str(smoke_initramfs), "--mem", "128", "--vcpus", "2"]
    runs = [
        [volt, "run", "--kernel", str(guest_kernel.bzimage), *common],
        [volt, "run", "--kernel", str(guest_kernel.vmlinux), "--boot", "pvh", *common],
    ]
    poweroff = base_archive(POWEROFF_INIT).write(tmp_path / "poweroff.cpio")
    ticker = base_archive(TICKER_INIT).write(tmp_path / "ticker.cpio")
    lifecycle = [sys.executable, str(HERE / "lab_lifecycle.py"), volt,
                 str(guest_kernel.bzimage), str(poweroff), str(ticker)]
    script = "; ".join(f"{shlex.join(cmd)}; echo VOLT-RC-{i}=$?" for i, cmd in enumerate(runs))
    script += "; " + shlex.join(lifecycle)
    res = lab.run(["sh", "-c", script], timeout=900)
    out = res.stdout
    tail = "\n".join(out.splitlines()[-30:]) + "\n--- stderr\n" + res.stderr[-2000:]
    rcs = dict(re.findall(r"VOLT-RC-(\d)=(\d+)", out))
    assert rcs == {"0": "0", "1": "0"}, tail
    assert out.count(SMOKE_MARKER) >= 2, tail
    assert out.count("smp: Brought up 1 node, 2 CPUs") == 2, tail
    life = json.loads(out.strip().splitlines()[-1])
    # No ACPI in the minimal kernel: poweroff halts every CPU with interrupts off,
    # which Volt detects and ends the VM with exit code 0.
    assert life["poweroff_marker"] and life["poweroff_rc"] == 0, life
    assert "guest halted (powered off)" in life["poweroff_stderr"], life
    assert life["ticking"] and life["ticks_while_paused"] == 0 and life["resumed"], life
    assert life["sigterm_rc"] == 143 and "SIGTERM" in life["sigterm_stderr"], life
