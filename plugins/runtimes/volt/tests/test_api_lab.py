"""Compatibility with Firecracker's tooling, on real Linux in the nested KVM lab.

One lab session boots the minimal guest kernel (an ELF vmlinux, as Firecracker boots)
three times from a busybox-init ext4 root: driven by the curl sequence of Firecracker's
getting-started guide, by Firecracker's own test-framework config file
(tests/data/firecracker_vm_config.json, paths replaced), and by pyrecracker, a
Firecracker client library from PyPI. Each run ends with SendCtrlAltDel: the i8042
delivers Ctrl-Alt-Del, busybox init runs its shutdown actions and reboots, and Volt
exits 0. The guest's own log shows the keyboard probed without "Keylock active".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools import cache

HERE = Path(__file__).parent
VOLT = str(Path(sys.executable).with_name("volt"))
PYRECRACKER = "pyrecracker==0.6.4"

RCS = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox dmesg | /bin/busybox grep -E 'i8042|serio|input:|Keylock|atkbd' \\
    | /bin/busybox sed 's/^/VOLT-DMESG /'
echo VOLT-FC-READY
"""
INITTAB = """::sysinit:/etc/init.d/rcS
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/busybox echo VOLT-SHUTDOWN-CLEAN
::shutdown:/bin/busybox umount -a -r
"""


def busybox_root(tmp: Path) -> Path:
    """A 32 MiB ext4 image whose /sbin/init is busybox init with the inittab above."""
    from volt.kernels.initramfs import busybox

    tree = tmp / "tree"
    for d in ("bin", "sbin", "etc/init.d", "dev", "proc", "sys", "tmp"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox(), tree / "bin/busybox")
    for link, target in (("bin/sh", "busybox"), ("sbin/init", "../bin/busybox"),
                         ("sbin/reboot", "../bin/busybox")):
        os.symlink(target, tree / link)
    (tree / "etc/inittab").write_text(INITTAB)
    (tree / "etc/init.d/rcS").write_text(RCS)
    (tree / "etc/init.d/rcS").chmod(0o755)
    img = tmp / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "32M"], check=True,
                   capture_output=True, timeout=120)
    return img


def pyrecracker_dir() -> str | None:
    """pyrecracker and requests-unixsocket in a cached directory (None: pip could not get
    them). pyrecracker declares Python >= 3.12 while Debian 12 has 3.11; its client needs
    nothing newer, so it is installed with --ignore-requires-python, code unchanged."""
    with cache.locked(f"pyrecracker-{cache.key(PYRECRACKER, sys.version_info[:2])}") as d:
        if not (d / "pyrecracker" / "client.py").is_file():
            r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(d),
                                "--ignore-requires-python", PYRECRACKER,
                                "requests-unixsocket<0.5"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                return None
        return str(d)


@pytest.mark.lab
@pytest.mark.slow
def test_firecracker_tooling_boots_linux_on_volt_and_ctrl_alt_del_shuts_it_down(
        lab, guest_kernel, tmp_path):
    if shutil.which("mkfs.ext4") is None or shutil.which("curl") is None:
        pytest.skip("mkfs.ext4 and curl are needed (apt-get install e2fsprogs curl)")
    rootfs = busybox_root(tmp_path)
    client = pyrecracker_dir()
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, str(HERE / "lab_firecracker.py"), VOLT, str(guest_kernel.vmlinux),
           str(rootfs), str(HERE / "data" / "firecracker_vm_config.json"), str(out)]
    res = lab.run(cmd + ([client] if client else []), timeout=1500, writable=[out])
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    print(json.dumps(results, indent=1))
    runs = ["getting_started", "config_file"] + (["pyrecracker"] if client else [])
    for name in runs:
        r = results[name]
        assert r["ready_s"] is not None, (name, r)                  # Linux reached its init
        assert r["rc"] == 0 and r["clean"], (name, r)               # Ctrl-Alt-Del: clean reboot
        dmesg = "\n".join(r["dmesg"])
        assert "serio: i8042 KBD port at 0x60,0x64 irq 1" in dmesg, (name, dmesg)
        assert "input: AT Raw Set 2 keyboard" in dmesg and "Keylock" not in dmesg, dmesg
    steps = dict(s.split(" ", 1) for s in results["getting_started"]["steps"])
    for step in ("logger", "boot-source", "drives", "actions"):
        assert steps[step].endswith("=> 204"), steps
    net = steps["network-interfaces"]
    from stellarium_core.plugins import installed

    if not any(p.name == "virtio-net" for p in installed("device")):
        assert "=> 400" in net and "virtio-net" in net, net      # the step names what is missing
    assert results["getting_started"]["log_lines"] > 0
    assert '"vcpu_count": 2' in results["config_file"]["machine"]
    assert '"mem_size_mib": 1024' in results["config_file"]["machine"]
    if client:
        assert '"state": "Paused"' in results["pyrecracker"]["paused"]
    else:
        pytest.skip("pyrecracker could not be installed from PyPI; the curl and config-file "
                    "runs passed")
