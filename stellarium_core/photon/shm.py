"""The ``shm`` tier: PHOTON's hot level, shared by every process on the host.

Chunks are kept verified and decompressed in a directory on a tmpfs (by default
``/dev/shm/stellarium-<id of the store path>``), one immutable file per chunk,
named by its digest. A chunk is verified and decompressed once, by the first
process that reads it, and then served to every process of the host (VMMs, the
FUSE view, the CLI) straight from shared pages: readers map the file and hand
out memoryviews over it (zero copy, no hashing).

Why a directory of immutable files and not one arena file with an index: the
kernel's dentry cache is a host-wide index that is already safe for concurrent
readers and writers in any number of processes, and a file is only ever created
whole (written under a temporary name, then renamed) and removed (unlinked),
never rewritten or truncated. An evicted chunk that a reader still has mapped
stays intact until that reader drops it, so eviction can never change bytes
under a reader, and nothing a reader maps can shrink under it (no SIGBUS).

Bounds: a ``ledger`` file holds the bytes and files in use; every put and
delete updates it under an ``flock``, so the capacity holds across processes.
Each process keeps its recently used mappings (``map_cache`` bytes, LRU); an
evicted chunk's pages are freed once no process maps it. Recency is host-wide
and needs no right to change file times (which a confined reader lacks): the
ledger also holds a table of "used" bytes, one per digest bucket, set (one
pwrite) by any process that maps a chunk; :meth:`ShmTier.keys` lists unused
chunks before used ones, oldest first, and clears the table (a second chance,
as the CLOCK algorithm gives). The ledger is never mapped: a process that
truncated it could then only skew the counts (healed by the next recount), not
raise SIGBUS in its readers.

Trust: the directory must be owned by this user and closed to everyone else
(checked on open), because readers do not re-hash what they find there.
Processes that parse untrusted input (a confined VMM) should be given it
read-only: they then use what trusted processes verified, and never place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stellarium_core.config import Field, at_least, validate_params
from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import (
    TierContext,
    TierFull,
    TierUnavailable,
    TierUsage,
    hookimpl,
)
from stellarium_core.photon.views import ViewCache

SHM_ROOT = Path("/dev/shm")
LEDGER = "ledger"
STORE = "store"  # which store the directory caches (for people, and for cleaning up)
_LEDGER = struct.Struct("<QQ")  # bytes in use, files
ABANDONED_AFTER = 60.0  # seconds: a temporary file this old lost its writer
USED_BUCKETS = 1 << 16  # the "used since the last eviction round" table after the header
_EMPTY = memoryview(b"")

FIELDS = {
    "capacity": Field("size", 256 << 20, at_least(1), doc="most bytes of chunk data held"),
    "path": Field(str, "", doc="directory on a tmpfs (default: /dev/shm/stellarium-<id of "
                               "the store path>)"),
    "map_cache": Field("size", 64 << 20, doc="bytes of mappings each process keeps open"),
    "min_available": Field("size", None, doc="PHOTON evicts hot chunks while the host's "
                                             "MemAvailable is below this (default: 5% of "
                                             "MemTotal; 0: never)"),
}


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_readonly(fd: int, size: int) -> memoryview:
    """A read-only view of ``size`` bytes of ``fd``, unmapped when its last view is gone.

    Through libc rather than :mod:`mmap`, which keeps a duplicate of ``fd`` open per
    mapping: a process holding a thousand hot chunks would run out of descriptors.
    """
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    buf = (ctypes.c_char * size).from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, size)
    return memoryview(buf).cast("B").toreadonly()


def default_path(store_path: Path) -> Path:
    """The hot directory of the store at ``store_path``: one per store, per host."""
    tag = hashlib.sha256(os.fsencode(store_path.resolve())).hexdigest()[:16]
    return SHM_ROOT / f"stellarium-{tag}"


def hot_dir(store_path: Path, params: dict[str, Any]) -> Path:
    """Where a ``shm`` tier with these (raw, unvalidated) params keeps its chunks."""
    path = params.get("path") or ""
    return Path(path).expanduser() if path else default_path(store_path)


class ShmTier:
    """Chunks as immutable files in a private tmpfs directory, shared by processes."""

    name = "shm"
    shared = True  # PHOTON: recency is host-wide, ask keys() for the eviction order

    def __init__(self, params: dict[str, Any], context: TierContext) -> None:
        self.params = validate_params(params, FIELDS)
        self.capacity: int = self.params["capacity"]
        self.min_available: int | None = self.params["min_available"]
        self.root = hot_dir(context.store_path, self.params)
        self.store_path = context.store_path
        self._maps = ViewCache(max_bytes=self.params["map_cache"])
        self._ledger_fd = -1
        self._writable = True
        self._lock = threading.Lock()  # opening and closing
        # Asked now: a confined process opens the tier lazily, where seccomp may refuse
        # geteuid (as it refuses the kill(pid, 0) a pid-based sweep would need).
        self._uid = os.geteuid()
        self._ledger_mu = threading.Lock()  # flock excludes processes, this our threads

    # -- the directory and its ledger ----------------------------------------------

    def _open(self) -> int:
        """The ledger's fd, making and checking the directory on first use."""
        if self._ledger_fd >= 0:
            return self._ledger_fd
        with self._lock:
            if self._ledger_fd < 0:
                self._ledger_fd = self._open_dir()
            return self._ledger_fd

    def _open_dir(self) -> int:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.root)
        except OSError as exc:
            raise TierUnavailable(f"shm tier {self.root}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != self._uid or st.st_mode & 0o077:
            raise TierUnavailable(
                f"shm tier {self.root} is not a directory private to uid {self._uid} "
                f"(owner {st.st_uid}, mode {stat.filemode(st.st_mode)}); its chunks are "
                "trusted unverified, so it is not used")
        path = self.root / LEDGER
        if not (self.root / STORE).exists():
            try:
                write_atomic(self.root / STORE, os.fsencode(self.store_path) + b"\n",
                             durable=False)
            except OSError:
                pass  # read-only to us; only a label
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except PermissionError:
            self._writable = False  # read-only access (a confined reader): map, never place
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as exc:
                raise TierUnavailable(f"shm tier {path}: {exc.strerror}") from None
        except OSError as exc:
            raise TierUnavailable(f"shm tier {path}: {exc.strerror}") from None
        return fd

    def _read_ledger(self, fd: int) -> tuple[int, int]:
        raw = os.pread(fd, _LEDGER.size, 0)
        return _LEDGER.unpack(raw) if len(raw) == _LEDGER.size else (0, 0)

    def _write_ledger(self, fd: int, used: int, files: int) -> None:
        os.pwrite(fd, _LEDGER.pack(max(0, used), max(0, files)), 0)

    def _locked(self, exclusive: bool) -> _Ledger:
        return _Ledger(self._open(), self._ledger_mu, exclusive)

    def _file(self, key: bytes) -> str:
        return f"{self.root}/{key.hex()}"  # a str: pathlib costs more than the syscalls

    # -- the tier contract -----------------------------------------------------------

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        """Place a verified chunk; TierFull when the ledger says it would not fit."""
        fd = self._open()
        if not self._writable:
            raise TierUnavailable(f"shm tier {self.root} is read-only to this process")
        final = self._file(key)
        if os.path.exists(final):
            return
        n = len(data)
        tmp = f"{self.root}/.{key.hex()}.{os.getpid()}.{threading.get_ident()}.tmp"
        placed = False
        try:
            tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o400)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(tfd, view):]
            finally:
                os.close(tfd)
            with self._locked(True):
                used, files = self._read_ledger(fd)
                if os.path.exists(final):
                    return
                if used + n > self.capacity:
                    raise TierFull(f"shm tier: {n} more bytes exceed its capacity of "
                                   f"{self.capacity} ({used} in use)")
                os.rename(tmp, final)
                placed = True
                self._write_ledger(fd, used + n, files + 1)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                self._writable = False
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFull(f"shm tier {self.root}: {exc.strerror}") from None
            raise TierUnavailable(f"shm tier {self.root}: {exc.strerror}") from None
        finally:
            if not placed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def view(self, key: bytes) -> memoryview | None:
        """The chunk as a read-only view over shared pages, or None if it is not here."""
        mv = self._maps.get(key)
        if mv is not None:
            return mv
        self._open()
        try:
            fd = os.open(self._file(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TierUnavailable(f"shm tier {self.root}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            mv = map_readonly(fd, size) if size else _EMPTY
        finally:
            os.close(fd)
        self._maps.put(key, mv)  # dropped ones are unmapped once their last view is gone
        if self._writable:
            with contextlib.suppress(OSError):  # host-wide recency; only a hint
                os.pwrite(self._ledger_fd, b"\1", _bucket(key))
        return mv

    def get(self, key: bytes) -> bytes | None:
        mv = self.view(key)
        return None if mv is None else bytes(mv)

    def contains(self, key: bytes) -> bool:
        if key in self._maps:
            return True
        self._open()
        return os.path.exists(self._file(key))

    def delete(self, key: bytes) -> None:
        fd = self._open()
        self._maps.pop(key)
        try:
            with self._locked(True):
                try:
                    size = os.stat(self._file(key)).st_size
                    os.unlink(self._file(key))
                except FileNotFoundError:
                    return
                used, files = self._read_ledger(fd)
                self._write_ledger(fd, used - size, files - 1)
        except OSError as exc:
            raise TierUnavailable(f"shm tier {self.root}: {exc.strerror}") from None

    def keys(self) -> Iterator[bytes]:
        """Every chunk held, least recently mapped first; recounts the ledger."""
        fd = self._open()
        found: list[tuple[int, int, bytes]] = []
        used = 0
        with self._locked(self._writable):
            table = os.pread(fd, USED_BUCKETS, _LEDGER.size).ljust(USED_BUCKETS, b"\0")
            with os.scandir(self.root) as it:
                for entry in it:
                    name = entry.name
                    if name.endswith(".tmp"):
                        with contextlib.suppress(OSError):  # a writer renames in microseconds
                            if self._writable and \
                                    entry.stat().st_mtime < time.time() - ABANDONED_AFTER:
                                os.unlink(entry.path)
                        continue
                    if len(name) != 64:
                        continue  # the ledger, the store label
                    try:
                        key = bytes.fromhex(name)
                        st = entry.stat(follow_symlinks=False)
                    except (ValueError, OSError):
                        continue
                    found.append((table[_bucket(key) - _LEDGER.size], st.st_mtime_ns, key))
                    used += st.st_size
            if self._writable:
                self._write_ledger(fd, used, len(found))  # heals a writer killed mid-put
                os.pwrite(fd, bytes(USED_BUCKETS), _LEDGER.size)  # a second chance, once
        found.sort()
        return iter([k for _, _, k in found])

    def usage(self) -> TierUsage:
        fd = self._open()
        with self._locked(False):
            used, files = self._read_ledger(fd)
        return TierUsage(files, used, self.capacity)

    def close(self) -> None:
        """Drop this process's mappings (views handed out stay valid); the chunks stay."""
        self._maps.clear()
        with self._lock:
            if self._ledger_fd >= 0:
                os.close(self._ledger_fd)
                self._ledger_fd = -1


def _bucket(key: bytes) -> int:
    """The byte of the "used" table that stands for ``key``."""
    return _LEDGER.size + int.from_bytes(key[:4], "little") % USED_BUCKETS


class _Ledger:
    """The ledger's flock (exclusive to change it, shared to read it), taken under a
    thread lock: threads of one process share the fd, and so its flock."""

    def __init__(self, fd: int, mu: threading.Lock, exclusive: bool) -> None:
        self.fd, self.mu, self.op = fd, mu, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH

    def __enter__(self) -> _Ledger:
        self.mu.acquire()
        try:
            fcntl.flock(self.fd, self.op)
        except BaseException:
            self.mu.release()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.mu.release()


@hookimpl
def stellarium_tier(name: str, params: dict[str, Any], context: TierContext) -> ShmTier | None:
    return ShmTier(params, context) if name == "shm" else None
