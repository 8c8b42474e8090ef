"""Pack files: where chunk bytes live, append-only, each chunk followed by its record.

Writes append whole batches with ``pwritev`` and one ``fdatasync`` per pack, and are
cut back on failure, so a pack never keeps half a batch. Reads go through one
read-only ``mmap`` per pack, remapped when the pack has grown.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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
from stellarium_core.nebula.table import PAGE, UNIT, Entry

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
    """Bytes a chunk takes in its pack: its bytes and record, 64-byte aligned."""
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
        self._fds: dict[int, int] = {}

    def path(self, n: int) -> Path:
        return self.dir / pack_name(n)

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
        try:
            for digest, data, raw, flags, codec in items:
                stored = len(data)
                if pos + stored > self.pack_max and pos > 0 and out:
                    _pwritev(fd, iov, iov_start)
                    cur += 1
                    fd = self._fd(cur, create=True)
                    touched[cur] = (fd, 0)
                    iov, pos, iov_start = [], 0, 0
                out.append((cur, pos))
                iov.append(data)
                iov.append(chunk_record(ChunkRecord(digest, pos, stored, raw, flags, codec)))
                end = pos + stored + RECORD_SIZE
                pad = align(end, UNIT) - end
                if pad:
                    iov.append(_ZEROS[:pad])
                pos = end + pad
            _pwritev(fd, iov, iov_start)
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
        """A read-only map of ``pack`` covering at least ``end`` bytes.

        Raises FileNotFoundError (the pack number as its argument) when the pack is
        gone, e.g. moved by a gc; CorruptChunkError when it is shorter than ``end``.
        """
        mm = self._maps.get(pack)
        if mm is None or len(mm) < end:
            try:
                fd = os.open(self.path(pack), os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(pack) from None
            try:
                size = os.fstat(fd).st_size
                if size < end:
                    raise CorruptChunkError(
                        f"{self.path(pack)} is truncated: {size} bytes, a chunk "
                        f"needs bytes up to {end}")
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            self._maps[pack] = mm
        return mm

    def drop(self, n: int) -> None:
        """Forget pack ``n``'s map and fd (before it is deleted)."""
        mm = self._maps.pop(n, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; let it live
                pass
        fd = self._fds.pop(n, None)
        if fd is not None:
            os.close(fd)

    def punch(self, e: Entry) -> None:
        """Free a dropped chunk's bytes in place (hole punch); at least erase its record.

        Without this, fsck would later find an intact record and report the released
        chunk as an unindexed one.
        """
        try:
            fd = self._fd(e.pack)
        except FileNotFoundError:
            return
        at = e.offset + e.stored
        if os.pread(fd, 8, at) == V1.TRAILER_MAGIC:  # a format-1 chunk owns whole pages
            size, end = V1.TRAILER_SIZE, align(at + V1.TRAILER_SIZE)
        else:
            size, end = RECORD_SIZE, e.offset + footprint(e)
        if _libc is not None and _libc.fallocate(fd, _PUNCH, e.offset, end - e.offset) == 0:
            return
        os.pwrite(fd, bytes(size), at)

    def close(self) -> None:
        for n in list(self._maps) + list(self._fds):
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
