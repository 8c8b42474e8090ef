"""End to end: one Debian image, imported once, becomes a VM's root filesystem. A real
Linux guest under Volt on real KVM (the lab) gets the image's VM form (EROFS over the
image's own chunks) as a virtio-stellar disk (``image=NAME``), switches root to it and
runs Debian's own binaries from it. The disk reads through PHOTON: a trusted process
warms the host-wide hot tier first, and the confined VMM's reads then hit it."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from devtools import stellar_host

BEGIN, END = "STELLAR-IMAGE-ROOT-BEGIN", "STELLAR-IMAGE-ROOT-END"

#: Run by the image's own /bin/sh as PID 1, with the image's EROFS as the root.
SCRIPT = f"echo {BEGIN}; cat /etc/debian_version; stat -f -c %T /; echo pid $$; echo {END}"


def stellar(cfg: Path, *args: object) -> str:
    return stellar_host.stellar(cfg, *args, timeout=600)


@pytest.mark.lab
def test_linux_guest_boots_into_an_image_vm_form(lab, guest_kernel, busybox_initramfs, tmp_path):
    from devtools.guest import image_root_init
    from devtools.rootfs import debian_rootfs

    src = debian_rootfs()
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    stellar(cfg, "host", "init")
    stellar(cfg, "image", "import", src, "debian")
    stellar(cfg, "image", "vmdisk", "debian")  # the device would build it too; do it ahead
    initrd = busybox_initramfs(image_root_init(SCRIPT), tmp_path / "init.cpio")

    volt = Path(sys.executable).with_name("volt")
    warm = [sys.executable, "-m", "stellarium_core", "--config", str(cfg),
            "image", "vmdisk", "debian", "--hot", "--json"]
    boot = [str(volt), "--config", str(cfg), "run", "--kernel", str(guest_kernel.bzimage),
            "--initrd", str(initrd), "--mem", "256",
            "--device", "virtio-stellar,image=debian",
            "--cmdline", "console=ttyS0 reboot=k panic=-1 pci=off",
            # Landlock rules do not hold on the lab's 9p share (a granted directory there
            # refuses new files, so the VMM could not save its PHOTON counters); on a
            # local filesystem they do (volt's tests/test_jail_photon.py). Seccomp stays.
            "--landlock=off"]
    # L1's /dev/shm is L1's own: warm it there, in the same run as the boot
    res = lab.run(["/bin/sh", "-c", f"{shlex.join(warm)} >&2 && exec {shlex.join(boot)}"],
                  timeout=600, writable=[tmp_path / "store"])
    out = res.stdout.replace("\r\n", "\n")
    assert BEGIN in out and END in out, (res.stderr[-2000:], out[-3000:])
    got = out.split(BEGIN + "\n", 1)[1].split(END, 1)[0].splitlines()
    assert got[0].encode() + b"\n" == (src / "etc/debian_version").read_bytes()
    assert got[1] == "erofs"                   # Debian's stat: / is the image's EROFS
    assert got[2] == "pid 1"                   # the image's own /bin/sh is init
    assert res.returncode == 0, (res.stderr[-2000:], out[-3000:])
    tiers = {t["level"]: t for t in json.loads(stellar(cfg, "tiers", "--json"))["tiers"]}
    warmed, _ = json.JSONDecoder().raw_decode(res.stderr[res.stderr.index("{"):])
    chunks = warmed["hot_chunks"]
    assert tiers["warm"]["hits"] >= chunks          # the warm-up read each chunk from NEBULA
    assert tiers["hot"]["hits"] > 0, tiers          # and the guest's reads then hit hot
    print(f"PHOTON after the boot: {tiers}", file=sys.stderr)
