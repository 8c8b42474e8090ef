"""Real Linux under full confinement in the lab: a writable Debian root on virtio-stellar.

One lab session, two boots of the same guest: under ``volt jail`` as an
unprivileged uid with cgroup v2 limits (the lab's L1 mounts cgroup2 with every
controller, which this machine's hybrid hierarchy lacks), then with plain
``volt run`` and its default confinement (Landlock at the lab kernel's ABI,
seccomp kill). Each guest writes a file into its ext4 root; the host reads both back
from the Stellarium volume.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from volt.kernels.initramfs import base_archive

UID = 1000
#: Where the store is copied inside the lab's L1 (its tmpfs, not the 9p share).
LOCAL = "/tmp/volt-jail-lab"
INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
tag=$(sed -n 's/.*volt_tag=\\([a-z0-9-]*\\).*/\\1/p' /proc/cmdline)
if mount -t ext4 /dev/vda /mnt; then
  chroot /mnt /bin/sh -c "echo \\"\\$(cat /etc/debian_version) $tag \\$(/usr/bin/uname -m)\\" \
    > /var/volt-$tag && /usr/bin/sync" && echo "VOLT-ROOT-WRITTEN $tag"
  umount /mnt
else
  echo "VOLT-ROOT-MOUNT-FAILED"
fi
reboot -f
"""


@pytest.mark.lab
@pytest.mark.slow
def test_confined_and_jailed_vms_boot_debian_from_a_writable_stellarium_root(
        lab, guest_kernel, tmp_path):
    if shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None:
        pytest.skip("mkfs.ext4/debugfs are not installed (apt-get install e2fsprogs)")
    from devtools.rootfs import debian_rootfs
    from devtools.stellar_host import host_with_volume

    root = debian_rootfs()
    img = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(img), "512M"],
                   check=True, capture_output=True, timeout=600)
    cfg = host_with_volume(tmp_path, "vm-root", img)
    img.unlink()
    cfg.chmod(0o644)
    initrd = base_archive(INIT).write(tmp_path / "init.cpio")
    volt = str(Path(sys.executable).with_name("volt"))

    def run_args(tag: str) -> list[str]:
        return ["--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd), "--mem", "256",
                "--device", "virtio-stellar,volume=vm-root",
                "--cmdline", f"console=ttyS0 reboot=k panic=-1 pci=off quiet volt_tag={tag}"]

    jail = [volt, "jail", "--id", "lab-1", "--uid", str(UID), "--gid", str(UID),
            "--chroot-base-dir", "/tmp/jails", "--cgroup", "memory.max=512M",
            "--cgroup", "pids.max=32", "--cgroup", "cpu.max=100000 100000", "--",
            "--config", f"{LOCAL}/host.toml", *run_args("jailed")]
    cg = "/sys/fs/cgroup/volt/lab-1"
    # The store is copied to L1's own tmpfs (a VM store lives on a local filesystem;
    # the share is 9p). A confined VMM has no CAP_DAC_OVERRIDE, so even as root it
    # writes only store files it owns: the store changes hands between the jailed
    # (uid 1000) and the root-run VM. The volume is exported back to the share.
    stellar = [sys.executable, "-m", "stellarium_core", "--config", f"{LOCAL}/host.toml"]
    confined = [volt, "--config", f"{LOCAL}/host.toml", "run", *run_args("confined")]
    script = f"""
mkdir -p {LOCAL} && cp -a {tmp_path / "store"} {cfg} {LOCAL}/ && chown -R {UID}:{UID} {LOCAL}
mount -t cgroup2 none /sys/fs/cgroup
{shlex.join(jail)} & J=$!
for i in $(seq 1 600); do grep -qs . {cg}/cgroup.procs && break; sleep 0.1; done
echo "VOLT-CG $(cat {cg}/memory.max) $(cat {cg}/pids.max) $(cat {cg}/cpu.max)" \
     "uid=$(awk '/^Uid/{{print $2}}' /proc/$(head -1 {cg}/cgroup.procs)/status)"
wait $J; echo JAIL-RC=$?
echo "VOLT-CG-LEFT $(ls -d /sys/fs/cgroup/volt/*/ | tr '\\n' ' ')"
chown -R 0:0 {LOCAL}
{shlex.join(confined)}; echo VOLT-RC=$?
{shlex.join([*stellar, "vol", "export", "vm-root", str(tmp_path / "export.ext4")])}
"""
    res = lab.run(["sh", "-c", script], timeout=1200, writable=[tmp_path])
    out = res.stdout.replace("\r\n", "\n")
    tail = out[-3000:] + "\n--- stderr\n" + res.stderr[-3000:]
    assert "VOLT-RC=0" in out and "JAIL-RC=0" in out, tail
    assert "VOLT-ROOT-WRITTEN confined" in out and "VOLT-ROOT-WRITTEN jailed" in out, tail
    assert re.search(r"volt: confined: landlock ABI \d+: filesystem .*seccomp kill",
                     res.stderr), tail
    assert f"VOLT-CG 536870912 32 100000 100000 uid={UID}" in out, tail
    assert "lab-1" not in out.split("VOLT-CG-LEFT", 1)[1].splitlines()[0], tail

    export = tmp_path / "export.ext4"
    want = (root / "etc/debian_version").read_text().strip()
    for tag in ("confined", "jailed"):
        got = subprocess.run(["debugfs", "-R", f"cat /var/volt-{tag}", str(export)],
                             capture_output=True, text=True, timeout=60).stdout.strip()
        assert got == f"{want} {tag} x86_64", (tag, got)
