"""End to end: a real Linux guest under Volt on real KVM (the lab) mounts an ext4 root
served from a Stellarium volume through virtio-stellar and prints a file from it, and
writes to a second, writable volume that the host then reads back."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from devtools.stellar_host import ext4_image, host_with_volume, stellar
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore

BEGIN, END = "STELLAR-ROOT-BEGIN", "STELLAR-ROOT-END"
GUEST_WROTE = b"written-by-the-guest through virtio-stellar"

INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if mount -t ext4 -o ro /dev/vda /mnt; then
  echo "{BEGIN}"
  cat /mnt/etc/debian_version
  echo "{END}"
  umount /mnt
else
  echo "STELLAR-ROOT-MOUNT-FAILED"
fi
for d in /sys/block/vd*; do
  # GET_ID: the device serial is the volume name.
  if [ "$(cat $d/serial)" = scratch ]; then
    printf '{GUEST_WROTE.decode()}' > /tmp/payload
    dd if=/tmp/payload of=/dev/${{d##*/}} bs=512 seek=8 conv=sync,fsync 2>/dev/null \
      && echo "STELLAR-SCRATCH-WRITTEN ${{d##*/}}"
  fi
done
reboot -f
poweroff -f
"""


@pytest.mark.lab
def test_linux_guest_reads_its_root_from_a_stellarium_volume(lab, guest_kernel,
                                                             busybox_initramfs, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    from devtools.rootfs import debian_rootfs

    want = (debian_rootfs() / "etc/debian_version").read_bytes()
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/debian_version").write_bytes(want)
    cfg = host_with_volume(tmp_path, "debroot", ext4_image(tree, tmp_path / "root.ext4"))
    stellar(cfg, "vol", "create", "scratch", "1MiB")
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")

    # `volt --config` reaches the devices: each opens its volume in that host's store.
    volt = Path(sys.executable).with_name("volt")
    res = lab.run([str(volt), "--config", str(cfg), "run", "--kernel", str(guest_kernel.bzimage),
                   "--initrd", str(initrd), "--mem", "256",
                   "--device", "virtio-stellar,volume=debroot,readonly=true",
                   "--device", "virtio-stellar,volume=scratch",
                   "--cmdline", "console=ttyS0 reboot=k panic=-1 pci=off"],
                  timeout=240, writable=[tmp_path / "store"])
    out = res.stdout.replace("\r\n", "\n")
    assert res.returncode == 0, (res.stderr[-2000:], out[-3000:])
    assert BEGIN in out and END in out, out[-3000:]
    got = out.split(BEGIN + "\n", 1)[1].split(END, 1)[0]
    assert got.encode() == want
    assert "STELLAR-SCRATCH-WRITTEN vdb" in out, out[-3000:]
    host = Host.from_config(cfg)
    with host.store as store, \
            VolumeStore(host.store_path / "volumes", store, host.hasher).open("scratch") as v:
        assert v.read(8 * 512, 512) == GUEST_WROTE.ljust(512, b"\0")
        assert v.read(0, 8 * 512) == bytes(8 * 512)
