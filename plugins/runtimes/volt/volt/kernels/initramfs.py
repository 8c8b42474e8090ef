"""Write initramfs images (newc cpio) from Python, and Volt's smoke-boot initramfs.

Writing the archive ourselves keeps it deterministic (fixed mtimes, sorted
entries, root ownership) and needs no root for device nodes, so the same
inputs always give the same bytes and the cache key is honest.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from stellarium_core.errors import StellarError
from volt import cache

#: The line the smoke /init prints once userspace runs; boot tests wait for it.
SMOKE_MARKER = "VOLT-INIT-OK"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, regular file, symlink or character device."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class Archive:
    """Collects entries, then serialises them as a newc cpio archive."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._entries:
                self._entries[d] = Entry(d, stat.S_IFDIR | 0o755)

    def dir(self, path: str, mode: int = 0o755) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = Entry(path, stat.S_IFDIR | mode)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = Entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = Entry(path, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        path = path.strip("/")
        self._parents(path)
        self._entries[path] = Entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        entries = sorted(self._entries.values(), key=lambda e: e.path)
        for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
            name = e.path.encode() + b"\0"
            nlink = 2 if stat.S_ISDIR(e.mode) else 1
            fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                      len(name), 0)
            out += b"070701" + b"".join(b"%08X" % f for f in fields) + name
            out += b"\0" * (-len(out) % 4)
            out += e.data
            out += b"\0" * (-len(out) % 4)
        return bytes(out)

    def write(self, path: Path) -> Path:
        """Write atomically (parallel readers never see a partial file)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path


def busybox() -> Path:
    """The static busybox binary the initramfs images run."""
    found = shutil.which("busybox")
    path = Path(found).resolve() if found else Path("/bin/busybox")
    if not path.is_file():
        raise StellarError("busybox not found; install busybox-static (apt-get install "
                           "busybox-static)")
    if b"\x00/lib64/ld-linux" in path.read_bytes()[:65536]:
        raise StellarError(f"{path} is dynamically linked; install busybox-static")
    return path


def base_archive(init: str) -> Archive:
    """An archive with busybox at /bin/busybox, /bin/sh, the usual dirs, and ``init``."""
    arc = Archive()
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "mnt", "etc", "root"):
        arc.dir(d)
    arc.chardev("dev/console", 5, 1)
    arc.chardev("dev/null", 1, 3, 0o666)
    arc.file("bin/busybox", busybox().read_bytes(), 0o755)
    arc.symlink("bin/sh", "busybox")
    arc.file("init", init.encode(), 0o755)
    return arc


SMOKE_INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{SMOKE_MARKER}"
echo "VOLT-INIT-KERNEL $(uname -r) CPUS $(grep -c ^processor /proc/cpuinfo)"
sync
reboot -f
poweroff -f
"""


def smoke_initramfs() -> Path:
    """A cached busybox initramfs whose /init prints ``VOLT-INIT-OK`` and reboots.

    With ``-no-reboot`` (QEMU) or an i8042/triple-fault reset exit (Volt), the
    VMM process ends right after the marker, so boot tests finish on their own.
    """
    bb = busybox()
    k = cache.key("smoke-initramfs", 1, SMOKE_INIT, bb.stat().st_size, bb.stat().st_mtime_ns)
    out = cache.root() / "initramfs" / f"smoke-{k}.cpio"
    with cache.locked(out):
        if not out.is_file():
            base_archive(SMOKE_INIT).write(out)
    return out
