"""The chunk index on disk: ``index.snap`` + ``index.log``, replayed into a
:class:`~stellarium_core.nebula.table.ChunkTable`, and the store lock around changes.

Several processes share one store. Each keeps its own table and catches up by
reading what others appended to the log (or reloading when someone compacted
it). Every change happens under an exclusive ``flock`` on ``lock``, with the
table caught up first, so appends never interleave and a torn tail can only be
a crashed writer's. Damage found while loading is kept in :attr:`Index.damage`
(and in ``DAMAGED`` on disk) for ``fsck``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.format import (
    DEL,
    LOG_FULL,
    LOG_HEADER,
    LOG_MAGIC,
    LOG_REC,
    LOG_SIZE,
    PUT,
    REF,
    SNAP_BLOCK,
    SNAP_HEADER,
    SNAP_MAGIC,
    V1,
    codec_field,
    codec_name,
)
from stellarium_core.nebula.table import (
    CODEC_MASK,
    DEAD,
    MAX_CODECS,
    PAGE,
    RECORD,
    UNIT,
    ChunkTable,
)

DAMAGED = "DAMAGED"


class Index:
    """Snapshot + log of one store directory, the table they give, and its lock.

    The table is only consistent under :attr:`mu`; :meth:`locked` adds the
    cross-process lock and catches up first.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mu = threading.RLock()
        self.table = ChunkTable()
        #: (file, byte offset, what) for damage seen while loading the index, for fsck
        self.damage: list[tuple[str, int, str]] = []
        self._lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        self._log_fd = -1
        self._log_ino = -1
        self._log_pos = 0
        self._snap_gen = 0
        self._log_stale = False
        self._log_v1 = False     # a format-1 log: read, and replaced by the next writer
        self._locked = 0
        self._marked = False
        with self.mu:
            self.catch_up()

    @cached_property
    def log_path(self) -> Path:
        """(Made once: every mapping of a chunk checks the log's inode.)"""
        return self.root / "index.log"

    @property
    def snap_path(self) -> Path:
        return self.root / "index.snap"

    @property
    def damage_path(self) -> Path:
        return self.root / DAMAGED

    @property
    def log_bytes(self) -> int:
        """Bytes of records in the log (what a compaction would fold away)."""
        return self._log_pos - LOG_HEADER.size

    @property
    def stale(self) -> bool:
        """The log is older than the snapshot (or missing/damaged): ignored until the
        next writer replaces it."""
        return self._log_stale

    def torn_tail(self) -> tuple[int, int] | None:
        """(offset, bytes) of records at the log's end that fail to parse: an
        interrupted append, dropped by the next writer; None when there are none."""
        if self._log_stale or self._log_fd < 0:
            return None
        size = os.fstat(self._log_fd).st_size
        return (self._log_pos, size - self._log_pos) if size > self._log_pos else None

    # -- loading -----------------------------------------------------------------------

    def _read_snapshot(self) -> tuple[int, ChunkTable]:
        """(generation, table) from ``index.snap``; (0, empty) when there is none.

        Records are crc'd in blocks: a damaged block loses only its own entries
        (noted in ``damage``; ``fsck --repair`` re-indexes them from the packs).
        """
        try:
            data = self.snap_path.read_bytes()
        except FileNotFoundError:
            return 0, ChunkTable()
        except OSError as exc:
            raise ChunkError(f"{self.snap_path}: cannot read the index: {exc.strerror}") from None
        v1 = data[:8] == V1.SNAP_MAGIC
        header = V1.SNAP_HEADER if v1 else SNAP_HEADER
        hs = header.size
        head = data[:hs]
        if (len(data) < hs + 4 or zlib.crc32(head) != int.from_bytes(data[hs:hs + 4], "little")
                or head[:8] not in (SNAP_MAGIC, V1.SNAP_MAGIC)):
            self.damage.append(("index.snap", 0, "header is damaged: every index entry "
                                "it held is lost (the chunks stay in the packs)"))
            return 0, ChunkTable()
        if v1:
            _, gen, count, nslots = header.unpack(head)
            codecs = [V1.CODEC]
        else:
            _, gen, count, nslots, names = header.unpack(head)
            try:
                codecs = [codec_name(names[i:i + 8]) for i in range(0, len(names), 8)
                          if names[i:i + 8].strip(b"\0")]
            except ValueError as exc:
                self.damage.append(("index.snap", 0, f"header is damaged ({exc}): every "
                                    "index entry it held is lost (the chunks stay in the packs)"))
                return 0, ChunkTable()
        nblocks = -(-count // SNAP_BLOCK)
        want = hs + 4 + count * RECORD + 4 * nblocks + 4 * nslots + 4
        if len(data) != want:
            self.damage.append(("index.snap", 0, f"is {len(data)} bytes, its header says "
                                f"{want}: every index entry it held is lost (the chunks "
                                "stay in the packs)"))
            return 0, ChunkTable()
        pos = hs + 4
        recs = memoryview(data)[pos:pos + count * RECORD]
        crcs = struct.unpack_from(f"<{nblocks}I", data, pos + count * RECORD)
        pos += count * RECORD + 4 * nblocks
        slots = data[pos:pos + 4 * nslots]
        slots_ok = (nslots >= 1024 and nslots & (nslots - 1) == 0 and nslots * 2 >= count * 3
                    and zlib.crc32(slots) == int.from_bytes(data[pos + 4 * nslots:][:4],
                                                            "little"))
        size = SNAP_BLOCK * RECORD
        bad = [i for i in range(nblocks) if zlib.crc32(recs[i * size:(i + 1) * size]) != crcs[i]]
        if v1:
            recs = memoryview(_v1_records(recs))
        if not bad and slots_ok:
            return gen, ChunkTable.load(recs, slots, codecs)
        keep = bytearray()
        for i in range(nblocks):
            if i in bad:
                self.damage.append((
                    "index.snap", hs + 4 + i * size,
                    f"snapshot records {i * SNAP_BLOCK}..{min(count, (i + 1) * SNAP_BLOCK) - 1}"
                    " fail their checksum (those index entries are lost)"))
            else:
                keep += recs[i * size:(i + 1) * size]
        return gen, ChunkTable.load(keep, None, codecs)

    def _reload(self) -> None:
        """Load snapshot + log from scratch (first open, or another process compacted)."""
        shared = self._locked == 0 and self._lock_fd >= 0
        if shared:  # a compaction swaps two files: never read them half-swapped
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            self.damage = []
            gen, table = self._read_snapshot()
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            self.table, self._snap_gen = table, gen
            try:
                fd = os.open(self.log_path, os.O_RDWR)
            except FileNotFoundError:
                # The next writer starts a new log; fsck --repair re-indexes from the packs.
                self.damage.append(("index.log", 0, "is missing: every index record "
                                    "since the snapshot is lost"))
                self._log_ino, self._log_pos, self._log_stale = 0, 0, True
                return
            except OSError as exc:
                raise ChunkError(f"{self.log_path}: cannot open the index: "
                                 f"{exc.strerror}") from None
            head = os.pread(fd, LOG_HEADER.size, 0)
            self._log_fd, self._log_ino = fd, os.fstat(fd).st_ino
            self._log_pos = LOG_HEADER.size
            magic = head[:8]
            self._log_v1 = magic == V1.LOG_MAGIC
            if len(head) < LOG_HEADER.size or magic not in (LOG_MAGIC, V1.LOG_MAGIC):
                self.damage.append(("index.log", 0, "header is damaged: every index "
                                    "record in it is lost (the chunks stay in the packs)"))
                log_gen = -1
            else:
                log_gen = LOG_HEADER.unpack(head)[2]
            # A log older than the snapshot was already folded into it (a compaction
            # stopped between its two renames): skip it; the next writer replaces it.
            self._log_stale = log_gen < gen
            if self._log_stale:
                self._log_pos = os.fstat(fd).st_size
            elif log_gen > gen:
                self.damage.append((
                    "index.snap", 0, f"snapshot generation {gen} is older than the log's "
                    f"({log_gen}): the snapshot was lost or replaced"))
        finally:
            if shared:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def catch_up(self) -> bool:
        """Apply records other processes appended (or reload after a compaction);
        whether the table may have changed. The caller holds :attr:`mu`."""
        try:
            ino = os.stat(self.log_path).st_ino
        except FileNotFoundError:
            ino = 0
        except OSError as exc:
            raise ChunkError(f"{self.log_path}: cannot read the index: {exc.strerror}") from None
        reloaded = ino != self._log_ino
        if reloaded:
            self._reload()
        if self.damage and not self._marked:
            self._mark_damaged()
        if self._log_stale:
            return reloaded
        size = os.fstat(self._log_fd).st_size
        if size <= self._log_pos:
            return reloaded
        data = os.pread(self._log_fd, size - self._log_pos, self._log_pos)
        self._log_pos += self._apply(data, self._log_pos)
        return True

    def replay(self) -> None:
        """Load snapshot and log again from scratch, seeing every damaged record
        (fsck; the caller holds :meth:`locked`)."""
        self._log_ino = -1
        self.catch_up()

    def _mark_damaged(self) -> None:
        """Record that the index lost entries, until ``fsck --repair`` has run.

        The damage is seen only while loading; once a writer compacts, the files
        look whole again. Until the index is rebuilt from the packs and the
        references recounted, ``gc`` must not trust it (it would drop chunks the
        index forgot), so the finding is kept on disk.
        """
        self._marked = True
        if self.damage_path.exists():
            return
        text = "".join(f"{f} @{off}: {what}\n" for f, off, what in self.damage)
        try:
            write_atomic(self.damage_path, text.encode())
        except OSError:
            pass  # a read-only store: every opener sees the damage again anyway

    def damaged(self) -> list[str]:
        """Index damage found by any opener and not yet repaired (``DAMAGED``)."""
        try:
            return self.damage_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def _apply(self, data: bytes, base: int) -> int:
        """Apply whole valid records; returns bytes consumed (a bad tail is left alone).

        A record that fails its crc but is followed by valid ones is damage, not a torn
        write: it is skipped and noted in ``damage`` for fsck.
        """
        table = self.table
        v1 = self._log_v1
        size, full, body_size = ((V1.LOG_SIZE, V1.LOG_FULL, V1.LOG_REC.size) if v1 else
                                 (LOG_SIZE, LOG_FULL, LOG_REC.size))
        view = memoryview(data)
        n = len(data) - len(data) % size
        good_end = 0
        bad: list[int] = []
        crc32 = zlib.crc32
        slots: dict[bytes, int] = {}
        o = -size
        for rec in full.iter_unpack(view[:n]):
            o += size
            if crc32(view[o:o + body_size]) != rec[-1]:
                bad.append(o)
                continue
            if bad:
                for b in bad:
                    self.damage.append(
                        ("index.log", base + b,
                         "record fails its checksum (that index record is lost)"))
                bad = []
            good_end = o + size
            if v1:
                kind, flags, pack, page, stored, raw, delta, digest, _ = rec
                offset, flags = page * PAGE, flags & 1   # flag 1: lz4, codec slot 1
                if flags:
                    flags = table.slot(V1.CODEC)
            else:
                kind, flags, pack, offset, stored, raw, delta, codec, digest, _ = rec
            if kind == PUT:
                if not v1:
                    slot = slots.get(codec)
                    if slot is None:
                        try:
                            slot = slots[codec] = table.slot(codec_name(codec))
                        except ValueError as exc:
                            self.damage.append(("index.log", base + o, f"{exc} (that index "
                                                "record is lost)"))
                            continue
                    flags = (flags & ~CODEC_MASK & ~DEAD) | slot
                try:
                    table.upsert(digest, pack, offset, stored, raw, delta, flags)
                except ValueError as exc:
                    self.damage.append(("index.log", base + o, f"{exc} (that index record "
                                        "is lost)"))
            elif kind == REF:
                try:
                    table.add_refs(digest, delta)
                except KeyError:
                    self.damage.append(("index.log", base + o,
                                        f"reference to unknown chunk {digest.hex()}"))
            elif kind == DEL:
                table.delete(digest)
            else:
                self.damage.append(("index.log", base + o, f"unknown record kind {kind}"))
        return good_end

    # -- changing ----------------------------------------------------------------------

    @contextmanager
    def locked(self, writing: bool = True) -> Iterator[None]:
        """Thread mutex + exclusive ``flock`` on the store, with the table caught up;
        ``writing`` also readies the log for :meth:`append`. Reentrant."""
        with self.mu:
            if self._locked == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._locked += 1
            try:
                self.catch_up()
                if writing:
                    self._ready_to_append()
                yield
            finally:
                self._locked -= 1
                if self._locked == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _ready_to_append(self) -> None:
        """Under the lock nobody is mid-append: drop a torn tail, replace a stale log,
        and fold a format-1 log into a snapshot (appends are format 2)."""
        if self._log_stale:
            self._write_log(self._snap_gen)
            return
        if self._log_v1:
            self.compact()
            return
        size = os.fstat(self._log_fd).st_size
        if size > self._log_pos:
            os.ftruncate(self._log_fd, self._log_pos)
            os.fdatasync(self._log_fd)

    def append(self, records: list[bytes], apply: Callable[[], None] | None = None) -> None:
        """Append and fsync records (caller holds :meth:`locked`); undone on failure.

        Once durable they are applied to the table: by re-reading them, or by
        ``apply`` when the caller can do the same updates without parsing.
        """
        end = os.fstat(self._log_fd).st_size
        buf = b"".join(records)
        try:
            written = os.pwrite(self._log_fd, buf, end)
            if written != len(buf):
                raise OSError(errno.ENOSPC, "short write to the index")
            os.fdatasync(self._log_fd)
        except OSError:
            try:
                os.ftruncate(self._log_fd, end)
            except OSError:
                pass
            raise
        if apply is None:
            self._log_pos = end + self._apply(buf, end)
        else:
            apply()
            self._log_pos = end + len(buf)

    def _write_log(self, gen: int) -> None:
        """Start a fresh, empty log of generation ``gen`` (tmp + rename; caller holds the lock)."""
        write_atomic(self.log_path, LOG_HEADER.pack(LOG_MAGIC, 32, gen))
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = os.open(self.log_path, os.O_RDWR)
        self._log_ino = os.fstat(self._log_fd).st_ino
        self._log_pos, self._log_stale, self._log_v1 = LOG_HEADER.size, False, False

    def compact(self) -> None:
        """Fold the log into a new snapshot (caller holds :meth:`locked`).

        Order: snapshot of generation G+1 (tmp, fsync, rename), then an empty log of
        G+1. A crash between leaves a G log that loaders know to skip.
        """
        gen = self._snap_gen + 1
        recs, slots = self.table.dump()
        count = len(recs) // RECORD
        size = SNAP_BLOCK * RECORD
        view = memoryview(recs)
        crcs = [zlib.crc32(view[i:i + size]) for i in range(0, len(recs), size)]
        names = b"".join(codec_field(c) for c in self.table.codecs).ljust(8 * MAX_CODECS, b"\0")
        head = SNAP_HEADER.pack(SNAP_MAGIC, gen, count, len(slots) // 4, names)
        tmp = self.root / "index.snap.tmp"
        with open(tmp, "wb") as fh:
            fh.write(head + zlib.crc32(head).to_bytes(4, "little"))
            fh.write(recs)
            fh.write(struct.pack(f"<{len(crcs)}I", *crcs))
            fh.write(slots + zlib.crc32(slots).to_bytes(4, "little"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snap_path)
        fsync_dir(self.root)
        self._snap_gen = gen
        self._write_log(gen)

    @staticmethod
    def create(root: Path) -> None:
        """An empty log of generation 0, unless there is one."""
        log = root / "index.log"
        if not log.exists():
            write_atomic(log, LOG_HEADER.pack(LOG_MAGIC, 32, 0))

    def close(self) -> None:
        with self.mu:
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1


def _v1_records(recs: memoryview) -> bytearray:
    """Format-1 table records as format 2: page numbers become 64-byte units, and
    flag bit 0 (lz4) becomes codec slot 1 (the only codec then)."""
    out = bytearray(recs)
    words = struct.Struct("<QQ")
    for o in range(32, len(out), RECORD):
        a, b = words.unpack_from(out, o)
        page = (a >> 16) & 0xFFFFFF
        a = (a & ~(0xFFFFFF << 16)) | (page * (PAGE // UNIT)) << 16
        b = (b & ((1 << 56) - 1)) | ((b >> 56) & 1) << 56
        words.pack_into(out, o, a, b)
    return out
