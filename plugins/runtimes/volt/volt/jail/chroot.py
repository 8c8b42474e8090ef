"""The jail's root: what a Python VMM needs, bind-mounted read-only, then pivot_root.

Firecracker copies one static binary into its jail. Volt is Python: the VMM
needs the interpreter, its standard library, the installed packages (and the
sources behind editable installs), the shared libraries they load, and
libseccomp's lookup (``ldconfig -p`` over ``/etc/ld.so.cache``). Each of those
paths appears in the jail at the same absolute path (symlinks on the way are
recreated, so ``/lib64/ld-linux-x86-64.so.2`` resolves as on the host), bound
read-only, nosuid, nodev. Nothing else of the host is visible.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import struct
import sys
import sysconfig
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155
#: The namespaces of packages the VMM may import plugins from.
PLUGIN_NAMESPACES = ("stellarium.hashers", "stellarium.chunkers", "stellarium.tiers",
                     "stellarium.devices", "stellarium.runtimes")
#: libseccomp is found through ``ldconfig -p`` (pyseccomp uses ctypes.util.find_library).
LOADER_FILES = ("/sbin/ldconfig", "/etc/ld.so.cache")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str | None, dst: str, flags: int, fstype: str | None = None) -> None:
    _check(_libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), None), f"mount {src} on {dst}")


def elf_interpreter(path: str) -> str | None:
    """The dynamic loader an ELF executable names (PT_INTERP), e.g. /lib64/ld-linux...."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            return None
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        for i in range(phnum):
            fh.seek(phoff + i * phentsize)
            p_type, _flags, offset, _va, _pa, filesz = struct.unpack("<IIQQQQ", fh.read(40))
            if p_type == 3:                                   # PT_INTERP
                fh.seek(offset)
                return fh.read(filesz).rstrip(b"\0").decode()
    return None


def python_paths() -> list[str]:
    """Every host path the VMM's Python needs, as the jailer's own Python sees them."""
    import pyseccomp  # noqa: F401  (loads libseccomp, so its directory is mapped below)

    paths = {sys.executable, os.path.realpath(sys.executable), sys.prefix,
             sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib"), *LOADER_FILES}
    interp = elf_interpreter(os.path.realpath(sys.executable))
    if interp:
        paths.add(interp)
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    tops = {"volt", "stellarium_core"} | {
        ep.value.partition(":")[0].partition(".")[0]
        for ns in PLUGIN_NAMESPACES for ep in entry_points(group=ns)}
    for top in tops:
        spec = importlib.util.find_spec(top)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            paths.add(loc)
        if spec and spec.origin and not spec.submodule_search_locations:
            paths.add(spec.origin)
    with open("/proc/self/maps") as fh:
        for line in fh:
            f = line.split(maxsplit=5)[-1].strip()
            if f.startswith("/") and os.path.exists(f):
                paths.add(os.path.dirname(f))
    return sorted(paths)


def _under(p: str, dirs: Iterable[str]) -> bool:
    return any(p == d or p.startswith(d.rstrip("/") + "/") for d in dirs)


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths that lie inside another one of the list (bound with it)."""
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths}):
        if not _under(p, out):
            out.append(p)
    return out


def _mirror(path: str, root: Path, binds: set[str], seen: set[str]) -> None:
    """Make ``path`` resolve in the jail as on the host: recreate symlinks, note binds."""
    if path in seen:
        return
    seen.add(path)
    cur = "/"
    parts = Path(path).parts[1:]
    for i, part in enumerate(parts):
        nxt = os.path.join(cur, part)
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            link = root / nxt.lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(target)
            resolved = os.path.normpath(os.path.join(cur, target, *parts[i + 1:]))
            _mirror(resolved, root, binds, seen)
            return
        cur = nxt
    binds.add(cur)


def expose(root: Path, ro: Iterable[str], rw: Iterable[str] = ()) -> list[tuple[str, bool]]:
    """Bind each path at the same place under ``root``; returns (path, writable).

    Must run in a private mount namespace (the binds vanish with it).
    """
    found: dict[bool, set[str]] = {False: set(), True: set()}
    for paths, writable in ((ro, False), (rw, True)):
        seen: set[str] = set()
        for p in paths:
            _mirror(os.path.abspath(p), root, found[writable], seen)
    writable = _outermost(found[True])
    # A writable tree inside a read-only one is bound over it afterwards (deeper last).
    binds = [(p, False) for p in _outermost(found[False]) if not _under(p, writable)]
    binds = sorted(binds + [(p, True) for p in writable], key=lambda b: b[0].count("/"))
    for src, rw_ in binds:
        dst = root / src.lstrip("/")
        if not dst.exists():
            if os.path.isdir(src):
                dst.mkdir(parents=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.touch()
        mount(src, str(dst), MS_BIND | MS_REC)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV
        mount(None, str(dst), flags if rw_ else flags | MS_RDONLY)
    return binds


def make_private() -> None:
    """Stop mount events from leaking to (or from) the host's namespace."""
    mount(None, "/", MS_REC | MS_PRIVATE)


def pivot(root: Path) -> None:
    """pivot_root into ``root``, detach the old root, chroot for good measure."""
    mount(str(root), str(root), MS_BIND | MS_REC)
    os.chdir(root)
    old = root / "old_root"
    old.mkdir()
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", b"old_root"), "pivot_root")
    _check(_libc.umount2(b"/old_root", MNT_DETACH), "umount old root")
    os.rmdir("/old_root")
    os.chroot(".")
    os.chdir("/")
