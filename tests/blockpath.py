"""Host-side block paths for tests: the real kernel mounts a disk served by our reader.

``mounted(image)`` loop-mounts an EROFS image file read-only. ``served(cfg, image)``
goes one step further: a child process serves an image's VM disk as one file of a
FUSE filesystem, read through :class:`ImageDisk` on every kernel request, and the
loop device sits on that file, so the kernel's EROFS reads travel block layer ->
loop -> FUSE -> ``ImageDisk.views`` -> NEBULA, with nothing exported first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def need_erofs_mount() -> None:
    """Skip (saying why) unless this process may loop-mount EROFS."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    if "erofs" not in Path("/proc/filesystems").read_text():
        pytest.skip("the host kernel has no erofs (modprobe erofs)")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed (util-linux)")


@contextmanager
def mounted(image: Path, where: Path) -> Iterator[Path]:
    """``image`` (an EROFS file) mounted read-only at ``where`` through a loop device."""
    need_erofs_mount()
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(where)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"the kernel refused the disk: {r.stderr}"
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=60)


def serve(config: str, image: str, mountpoint: str) -> None:
    """Child side of :func:`served`: ``<mountpoint>/disk`` is the VM disk of ``image``."""
    import errno
    import stat

    from fuse import FUSE, FuseOSError, Operations

    from stellarium_core.distribution import ImageStore
    from stellarium_core.distribution.vmdisk import vm_disk
    from stellarium_core.host import Host
    from stellarium_core.volumes.imagedisk import ImageDisks

    host = Host.from_config(config)
    disks = ImageDisks.for_host(host)
    disk = disks.open(vm_disk(ImageStore.for_host(host), disks, image).image)

    class DiskFile(Operations):
        def getattr(self, path: str, fh: int | None = None) -> dict:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            if path == "/disk":
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": disk.size}
            raise FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", "disk"]

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            return disk.read(offset, max(0, min(size, disk.size - offset)))

    FUSE(DiskFile(), mountpoint, foreground=True, ro=True, nothreads=True)


@contextmanager
def served(config: Path, image: str, where: Path) -> Iterator[Path]:
    """The VM disk of ``image`` mounted at ``where`` via loop over a FUSE-served file."""
    need_erofs_mount()
    pytest.importorskip("fuse", reason="fusepy is not installed (the voltainer plugin needs it)")
    if not Path("/dev/fuse").exists():
        pytest.skip("/dev/fuse is missing")
    fusedir = where.with_name(where.name + ".fuse")
    fusedir.mkdir(parents=True, exist_ok=True)
    code = "import sys; from tests.blockpath import serve; serve(*sys.argv[1:])"
    child = subprocess.Popen([sys.executable, "-c", code, str(config), image, str(fusedir)],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (fusedir / "disk").exists():
            assert child.poll() is None, f"the FUSE server stopped: {child.stderr.read()}"
            assert time.monotonic() < deadline, "the FUSE server did not come up"
            time.sleep(0.05)
        with mounted(fusedir / "disk", where):
            yield where
    finally:
        subprocess.run(["umount", str(fusedir)], capture_output=True, timeout=60)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
