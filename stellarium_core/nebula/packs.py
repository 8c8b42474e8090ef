"""Pack files: where chunk bytes live, append-only, each chunk followed by its record.

Writes append whole batches with ``pwritev`` and one ``fdatasync`` per pack, and are
cut back on failure, so a pack never keeps half a batch. Reads go through one
read-only ``mmap`` per pack, remapped when the pack has grown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
from pathlib import Path

from stellarium_core.fsutil import fsync_dir
from stellarium_core.nebula.errors import ChunkError, CorruptChunkError
from stellarium_core.nebula.format import (
    PACK_RE,
    RECORD_SIZE,
    V1,
    ChunkRecord,
    align,
    chunk_record,
    pack_name,
)
from stellarium_core.nebula.table import MAPPABLE, PAGE, UNIT, Entry

PACK_MAX = 1 << 30
_ZEROS = bytes(PAGE)
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()

#: What a pack write returns for :meth:`Packs.cut_back`: (fd, length before) per pack.
Undo = list[tuple[int, int]]
#: A chunk to write: digest, stored bytes, raw length, persisted flags, compressor name.
Item = tuple[bytes, bytes | memoryview, int, int, str]


def footprint(e: Entry) -> int:
    """Bytes a chunk takes in its pack: its bytes and record, aligned (a mappable
    chunk's record lies elsewhere, after it)."""
    if e.mappable:
        return align(e.stored, PAGE) + RECORD_SIZE
    return align(e.stored + RECORD_SIZE, UNIT)


class Packs:
    """The ``packs/`` directory of one store: numbering, appends, maps, hole punching.

    Not thread-safe on its own: the store calls it under its index lock (writes)
    or its mutex (maps).
    """

    def __init__(self, root: Path, pack_max: int = PACK_MAX) -> None:
        self.dir = root / "packs"
        self.pack_max = pack_max
        self._maps: dict[int, mmap.mmap] = {}
        self._fds: dict[int, int] = {}     # for appends
        self._rfds: dict[int, int] = {}    # for maps
        self._paths: dict[int, Path] = {}

    def path(self, n: int) -> Path:
        """Pack ``n``'s file (made once per pack: a restore asks for it per chunk)."""
        p = self._paths.get(n)
        if p is None:
            p = self._paths[n] = self.dir / pack_name(n)
        return p

    def numbers(self) -> list[int]:
        try:
            names = os.listdir(self.dir)
        except OSError as exc:
            raise ChunkError(f"{self.dir}: {exc.strerror}") from None
        return sorted(int(m.group(1)) for m in map(PACK_RE.match, names) if m)

    def _fd(self, n: int, create: bool = False) -> int:
        fd = self._fds.get(n)
        if fd is None:
            path = self.path(n)
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            self._fds[n] = fd
            if create:
                fsync_dir(path.parent)
        return fd

    def write(self, items: list[Item],
              first_pack: int | None = None) -> tuple[list[tuple[int, int]], Undo]:
        """Append chunks (see :data:`Item`) and fsync the packs.

        Starts in the newest pack (or ``first_pack``). Returns (pack, offset) per
        item, and what :meth:`cut_back` needs if the index append then fails. On
        failure here every pack is cut back already, so nothing half-written stays.
        """
        packs = self.numbers()
        if first_pack is not None:
            cur = first_pack
        else:
            cur = packs[-1] if packs else 1
        fd = self._fd(cur, create=True)
        start = os.fstat(fd).st_size
        if start >= self.pack_max and start:
            cur += 1
            fd, start = self._fd(cur, create=True), 0
        touched = {cur: (fd, start)}
        out: list[tuple[int, int]] = []
        iov: list[bytes | memoryview] = []
        pos = align(start, UNIT)
        iov_start = start
        if pos > start:
            iov.append(_ZEROS[:pos - start])
        deferred: list[bytes] = []  # records of mappable chunks: after them, in their pack
        try:
            for digest, data, raw, flags, codec in items:
                stored = len(data)
                mappable = flags & MAPPABLE
                if mappable and codec:
                    raise ValueError(f"mappable chunk {digest.hex()} must be stored raw")
                at = align(pos, PAGE) if mappable else pos
                if at + stored > self.pack_max and pos > 0 and out:
                    _pwritev(fd, iov + deferred, iov_start)
                    cur += 1
                    fd = self._fd(cur, create=True)
                    touched[cur] = (fd, 0)
                    iov, deferred, pos, at, iov_start = [], [], 0, 0, 0
                if at > pos:
                    iov.append(_ZEROS[:at - pos])
                out.append((cur, at))
                iov.append(data)
                record = chunk_record(ChunkRecord(digest, at, stored, raw, flags, codec))
                if mappable:   # zeros to the end of its last page, nothing else in it
                    pos = align(at + stored, PAGE)
                    iov.append(_ZEROS[:pos - at - stored])
                    deferred.append(record)
                else:
                    iov.append(record)
                    pos = align(at + stored + RECORD_SIZE, UNIT)
                    iov.append(_ZEROS[:pos - at - stored - RECORD_SIZE])
            _pwritev(fd, iov + deferred, iov_start)
            for f, _ in touched.values():
                os.fdatasync(f)
        except OSError:
            self.cut_back(list(touched.values()))
            raise
        return out, list(touched.values())

    @staticmethod
    def cut_back(undo: Undo) -> None:
        """Truncate packs to their lengths before a failed write (best effort)."""
        for fd, old in undo:
            try:
                os.ftruncate(fd, old)
            except OSError:
                pass

    def map(self, pack: int, end: int) -> mmap.mmap:
        """A read-only map of ``pack`` covering at least ``end`` bytes, which the pack
        file still has: it is checked on every call, so a pack truncated behind the
        store's back is a CorruptChunkError here, not a SIGBUS on access.

        Raises FileNotFoundError (the pack number as its argument) when the pack is
        gone, e.g. moved by a gc.
        """
        fd = self._rfds.get(pack)
        if fd is None:
            try:
                fd = self._rfds[pack] = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise FileNotFoundError(pack) from None
        size = os.fstat(fd).st_size
        if size < end:
            raise CorruptChunkError(f"{self.path(pack)} is truncated: {size} bytes, a chunk "
                                    f"needs bytes up to {end}")
        mm = self._maps.get(pack)
        if mm is None or len(mm) < end:
            mm = self._maps[pack] = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        return mm

    def lease(self, pack: int) -> int:
        """A read-only fd of ``pack`` holding a shared ``flock``: while any is open
        (in any process), :meth:`claim` fails, so gc leaves the pack alone. Waits
        while a gc works on the pack; the caller checks the pack is still linked
        (``st_nlink``) and its chunk still there. FileNotFoundError when it is gone."""
        fd = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def claim(self, pack: int) -> int | None:
        """An fd holding ``pack`` exclusively (close it to let go), or None when a
        mapper holds a :meth:`lease` on it."""
        fd = os.open(self.path(pack), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def drop(self, n: int) -> None:
        """Forget pack ``n``'s map and fd (before it is deleted)."""
        mm = self._maps.pop(n, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; let it live
                pass
        for fds in (self._fds, self._rfds):
            fd = fds.pop(n, None)
            if fd is not None:
                os.close(fd)

    def punch(self, e: Entry) -> None:
        """Free a dropped chunk's bytes in place (hole punch); failing that, erase its
        record (a mappable chunk's bytes: its record lies elsewhere).

        Without this, fsck would later find an intact record and report the released
        chunk as an unindexed one.
        """
        try:
            fd = self._fd(e.pack)
        except FileNotFoundError:
            return
        at = e.offset + e.stored
        if e.mappable:   # its record lies elsewhere: without its bytes it is no chunk
            at, size, end = e.offset, e.stored, align(at, PAGE)
        elif os.pread(fd, 8, at) == V1.TRAILER_MAGIC:  # a format-1 chunk owns whole pages
            size, end = V1.TRAILER_SIZE, align(at + V1.TRAILER_SIZE)
        else:
            size, end = RECORD_SIZE, e.offset + footprint(e)
        if _libc is not None and _libc.fallocate(fd, _PUNCH, e.offset, end - e.offset) == 0:
            return
        os.pwrite(fd, bytes(size), at)

    def close(self) -> None:
        for n in {*self._maps, *self._fds, *self._rfds}:
            self.drop(n)


def _pwritev(fd: int, iov: list[bytes | memoryview], offset: int) -> None:
    limit = min(os.sysconf("SC_IOV_MAX"), 1024)
    for i in range(0, len(iov), limit):
        part = iov[i:i + limit]
        want = sum(len(b) for b in part)
        done = os.pwritev(fd, part, offset)
        while done < want:  # short write: finish it byte-exactly or fail
            flat = b"".join(bytes(b) for b in part)[done:]
            n = os.pwrite(fd, flat, offset + done)
            if n == 0:
                raise OSError(errno.ENOSPC, "no space left on device")
            done += n
        offset += want
