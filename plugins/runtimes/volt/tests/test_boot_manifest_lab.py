"""End to end in the nested KVM lab: a real Linux guest's first boot is traced into a
boot manifest's prefetch set (`volt boot record --trace-from-boot`), then the guest boots
again from the manifest alone (`volt run --boot NAME`): kernel and initrd from NEBULA by
digest, root from a Stellarium volume over virtio-stellar, the prefetch set read first."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from volt.cli import main

from devtools.stellar_host import ext4_image, host_with_volume
from stellarium_core import boot
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore

BEGIN, END = "BOOT-MANIFEST-BEGIN", "BOOT-MANIFEST-END"
INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if mount -t ext4 -o ro /dev/vda /mnt; then
  echo "{BEGIN} $(md5sum < /mnt/payload | cut -d' ' -f1) {END}"
  umount /mnt
else
  echo "BOOT-MANIFEST-MOUNT-FAILED"
fi
reboot -f
"""
CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off"


@pytest.mark.lab
def test_record_with_a_traced_boot_then_boot_from_the_manifest(lab, guest_kernel,
                                                              busybox_initramfs, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    tree = tmp_path / "tree"
    tree.mkdir()
    payload = os.urandom(3 << 20)          # 48 chunks of 64 KiB the guest must read
    (tree / "payload").write_bytes(payload)
    cfg = host_with_volume(tmp_path, "root", ext4_image(tree, tmp_path / "root.ext4"))
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    assert main(["--config", str(cfg), "kernel", "import", str(guest_kernel.bzimage),
                 "--initrd", str(initrd), "--name", "guest"]) == 0

    volt = str(Path(sys.executable).with_name("volt"))
    c = [volt, "--config", str(cfg)]
    record = [*c, "boot", "record", "web", "--kernel", "guest", "--initrd", "guest",
              "--volume", "root", "--mem", "256", "--cmdline", CMDLINE, "--trace-from-boot"]
    run = [*c, "run", "--boot", "web", "--timing"]
    script = f"{shlex.join(record)}; echo REC-RC=$?; {shlex.join(run)}; echo RUN-RC=$?"
    res = lab.run(["sh", "-c", script], timeout=600, writable=[tmp_path / "store"])
    out = res.stdout.replace("\r\n", "\n")
    tail = "\n".join(out.splitlines()[-30:]) + "\n--- stderr\n" + res.stderr[-3000:]
    assert "REC-RC=0" in out and "RUN-RC=0" in out, tail
    want = hashlib.md5(payload).hexdigest()
    assert out.count(f"{BEGIN} {want} {END}") == 2, tail    # the traced boot, then the manifest's

    # The prefetch set is the volume's chunks in the order the guest first read them:
    # at least the 48 slots the payload fills, and nothing that is not the volume's.
    host = Host.from_config(cfg)
    m = boot.load(host, "web").manifest
    with VolumeStore.for_host(host).open("root", readonly=True) as vol:
        chunks = {r.digest for r in vol.manifest.refs.values() if not r.zero}
    assert set(m.prefetch) <= chunks and len(m.prefetch) >= len(payload) >> 16, \
        (len(m.prefetch), len(chunks))
    # The second boot read that set before its vCPUs started, and said how long it took.
    setup = re.search(r"volt: setup [\d.]+ ms .*", res.stderr + out)
    assert setup and re.search(r"prefetch [\d.]+", setup.group(0)), res.stderr[-3000:]
    print(f"\n{setup.group(0)}\nprefetch set: {len(m.prefetch)} chunks")
