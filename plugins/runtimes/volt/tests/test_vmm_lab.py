"""A real Linux boot under Volt inside the nested KVM lab (one lab boot, two guest boots)."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
from volt.kernels.initramfs import SMOKE_MARKER


@pytest.mark.lab
@pytest.mark.slow
def test_linux_boots_to_init_marker_bzimage_and_pvh(lab, guest_kernel, smoke_initramfs):
    volt = [str(Path(sys.executable).with_name("volt"))]
    common = ["--initrd", str(smoke_initramfs), "--mem", "128", "--vcpus", "2"]
    runs = [
        volt + ["run", "--kernel", str(guest_kernel.bzimage), *common],
        volt + ["run", "--kernel", str(guest_kernel.vmlinux), "--boot", "pvh", *common],
    ]
    script = "; ".join(f"{shlex.join(cmd)}; echo VOLT-RC-{i}=$?" for i, cmd in enumerate(runs))
    res = lab.run(["sh", "-c", script], timeout=600)
    out = res.stdout
    tail = "\n".join(out.splitlines()[-30:]) + "\n--- stderr\n" + res.stderr[-2000:]
    rcs = dict(re.findall(r"VOLT-RC-(\d)=(\d+)", out))
    assert rcs == {"0": "0", "1": "0"}, tail
    assert out.count(SMOKE_MARKER) >= 2, tail
    assert out.count("smp: Brought up 1 node, 2 CPUs") == 2, tail
