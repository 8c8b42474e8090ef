"""End to end in the lab, under Volt's default confinement: the guest's hw_random core
picks virtio-rng and /dev/hwrng hands out the host's entropy."""

from __future__ import annotations

import re

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.lab_devices import VOLT, lab_scenario

INIT = BUSYBOX_PRELUDE + """
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
for n in A B; do
  echo "RNG-$n $(dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')"
done
reboot -f
"""


@pytest.mark.lab
def test_guest_reads_entropy_from_the_host(lab, guest_kernel, busybox_initramfs, tmp_path):
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    argv = [VOLT, "run", "--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd),
            "--mem", "128", "--cmdline", CMDLINE, "--device", "virtio-rng,bytes_per_sec=65536"]
    out = lab_scenario(lab, "plain", {"argv": argv})
    console = out["console"]
    assert out["exit"] == 0, (out["stderr"], console[-3000:])
    assert "seccomp kill" in out["stderr"]
    assert re.search(r"RNG-CURRENT virtio_rng\.\d", console), console[-3000:]
    draws = re.findall(r"RNG-[AB] ([0-9a-f]*)", console)
    assert len(draws) == 2 and all(len(d) == 64 for d in draws), console[-3000:]
    assert draws[0] != draws[1] and "0" * 64 not in draws
