"""Real Linux under Volt inside the nested KVM lab: one lab session, four guest boots.

bzImage (64-bit boot protocol) and vmlinux (PVH) each boot to the smoke init's
marker with 2 vCPUs; then a guest that powers off, and one that is paused,
resumed and stopped with SIGTERM.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
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


READ_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
before=$(awk '{{print $1}}' /sys/block/vda/stat)
dd if=/dev/vda of=/dev/null bs=4096 count={count} iflag=direct 2>/dev/null
after=$(awk '{{print $1}}' /sys/block/vda/stat)
echo "VOLT-READS $((after - before))"
poweroff -f
"""


@pytest.mark.lab
@pytest.mark.slow
def test_a_virtio_read_costs_the_guest_one_exit(lab, guest_kernel, busybox_initramfs, tmp_path):
    """4 KiB O_DIRECT reads from a virtio-stellar disk: the kick and the interrupt ACK go
    through KVM ioeventfds, so each request costs one MMIO exit (the InterruptStatus read).
    Two guests, 0 and 400 reads; the difference in exits over the difference in requests."""
    from stellarium_core.plugins import installed

    if not any(p.name == "virtio-stellar" for p in installed("device")):
        pytest.skip("the virtio-stellar device plugin is not installed")
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    for args in (["host", "init"], ["vol", "create", "data", "8MiB"]):
        r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                            *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    volt = str(Path(sys.executable).with_name("volt"))
    runs = []
    for count in (0, 400):
        initrd = busybox_initramfs(READ_INIT.format(count=count), tmp_path / f"r{count}.cpio")
        runs.append(shlex.join([volt, "--config", str(cfg), "run", "--kernel",
                                str(guest_kernel.bzimage), "--initrd", str(initrd),
                                "--mem", "128", "--timing", "--device",
                                "virtio-stellar,volume=data,readonly=true",
                                "--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"]) + " 2>&1")
    res = lab.run(["sh", "-c", "; ".join(runs)], timeout=900, writable=[tmp_path / "store"])
    out = res.stdout
    reads = [int(n) for n in re.findall(r"VOLT-READS (\d+)", out)]
    exits = [dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", line))
             for line in re.findall(r"volt: exits (.*)", out)]
    assert len(reads) == 2 and len(exits) == 2, out[-3000:]
    requests = reads[1] - reads[0]
    assert requests >= 400, reads
    mmio = [e.get("mmio_read", 0) + e.get("mmio_write", 0) for e in exits]
    per_request = (mmio[1] - mmio[0]) / requests
    print(f"MMIO exits per 4 KiB read: {per_request:.2f} ({mmio}, requests {reads})")
    assert per_request < 1.3, (per_request, exits, reads)
