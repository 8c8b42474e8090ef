"""End to end: a VMM boots real Linux whose root filesystem is a Stellarium volume
exported by ``stellar vol serve --vhost-user``: QEMU (-M microvm, memfd guest RAM,
vhost-user-blk) and Volt (``--device vhost-user-blk,socket=PATH``, run as its CLI, never
imported). The guest's init (on that volume) writes a file; the host reads it back from
the volume, and both the guest's ext4 and the NEBULA store check clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.stellar_host import ext4_image, host_with_volume, stellar

BEGIN, DONE = "VHOST-ROOT-UP", "VHOST-ROOT-DONE"
MARKER = b"root from a Stellarium volume over vhost-user-blk\n"
GUEST_WROTE = "written-by-the-guest through vhost-user-blk"

#: /sbin/init on the volume itself: the kernel mounts the volume as / and runs it.
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "{BEGIN}"
/bin/busybox cat /etc/marker
echo "{GUEST_WROTE}" > /guest-wrote.txt
/bin/busybox sync
/bin/busybox mount -o remount,ro /
echo "{DONE}"
/bin/busybox reboot -f
"""

CMDLINE = "console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=/sbin/init panic=-1 quiet"

#: Runs inside the lab (L1): the export server, then the VMM as its client, then SIGTERM.
IN_LAB = r"""
import json, os, signal, subprocess, sys, time
cfg, sock, timeout, vmm = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
server = subprocess.Popen([sys.executable, "-m", "stellarium_core", "--config", cfg,
                           "vol", "serve", "root", "--vhost-user", sock],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
deadline = time.monotonic() + 120
while not os.path.exists(sock):
    if server.poll() is not None or time.monotonic() > deadline:
        print("SERVER-FAILED", server.communicate()[1]); sys.exit(3)
    time.sleep(0.1)
vm = subprocess.Popen(vmm, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
try:
    qout, qerr = vm.communicate(timeout=timeout)
except subprocess.TimeoutExpired:
    vm.kill()
    qout, qerr = vm.communicate()
    qerr += "VMM-TIMEOUT"
server.send_signal(signal.SIGTERM)
out, err = server.communicate(timeout=60)
print(qout)
print("VMM-EXIT", vm.returncode, qerr[-2000:])
print("SERVER-EXIT", server.returncode)
print("SERVER-LOG", err)
"""


def vmm_argv(vmm: str, kernel: Path, sock: str, cfg: Path) -> list[str]:
    if vmm == "qemu":
        return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,"
                "acpi=off,memory-backend=mem", "-enable-kvm", "-cpu", "host", "-m", "256",
                "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                "-no-reboot", "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
                "-global", "virtio-mmio.force-legacy=false",
                "-chardev", f"socket,id=vu,path={sock}",
                "-device", "vhost-user-blk,chardev=vu,num-queues=1",
                "-kernel", str(kernel), "-append", CMDLINE + " reboot=t"]
    volt = Path(sys.executable).with_name("volt")     # the CLI, as a user runs it
    return [str(volt), "--config", str(cfg), "run", "--kernel", str(kernel), "--mem", "256",
            "--device", f"vhost-user-blk,socket={sock}", "--cmdline", CMDLINE + " reboot=k"]


@pytest.mark.lab
@pytest.mark.parametrize("vmm", ["qemu", "volt"])
def test_vmm_boots_linux_with_its_root_on_a_served_volume(lab, guest_kernel, tmp_path, vmm):
    for tool in ("mkfs.ext4", "e2fsck", "debugfs", "busybox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install e2fsprogs busybox-static)")
    tree = tmp_path / "tree"
    for d in ("bin", "sbin", "etc", "proc", "dev"):
        (tree / d).mkdir(parents=True)
    shutil.copy(shutil.which("busybox"), tree / "bin/busybox")
    (tree / "sbin/init").write_text(INIT)
    (tree / "sbin/init").chmod(0o755)
    (tree / "etc/marker").write_bytes(MARKER)
    img = ext4_image(tree, tmp_path / "root.ext4", "32M")
    cfg = host_with_volume(tmp_path, "root", img)

    sock = "/run/vhost-root.sock"
    argv = vmm_argv(vmm, guest_kernel.bzimage, sock, cfg)
    res = lab.run([sys.executable, "-c", IN_LAB, str(cfg), sock, "240", json.dumps(argv)],
                  timeout=420, writable=[tmp_path / "store"])
    out = res.stdout.replace("\r\n", "\n")
    assert res.returncode == 0, (res.stderr[-2000:], out[-3000:])
    assert BEGIN in out and DONE in out, out[-4000:]
    assert MARKER.decode() in out.split(BEGIN, 1)[1]
    assert "SERVER-EXIT 0" in out and "client 1: connected" in out, out[-3000:]
    assert "memory table" in out

    back = tmp_path / "back.ext4"
    stellar(cfg, "vol", "export", "root", back)
    got = subprocess.run(["debugfs", "-R", "cat /guest-wrote.txt", str(back)],
                         capture_output=True, text=True, timeout=60)
    assert got.stdout == GUEST_WROTE + "\n", got
    fsck = subprocess.run(["e2fsck", "-fn", str(back)], capture_output=True, text=True,
                          timeout=60)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert '"ok": true' in stellar(cfg, "fsck", "--json")
