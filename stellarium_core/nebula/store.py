"""NEBULA: the content-addressed chunk store.

On disk, under ``root`` (``<store>/nebula``):

- ``packs/pack-NNNNNN.dat``: append-only. Each chunk's bytes start at a 4 KiB-aligned
  offset and are followed by a 56-byte trailer (magic, digest, lengths, flags, crc), so
  a pack can be re-indexed from its own bytes if the index is lost.
- ``index.log``: a 16-byte header and fixed 56-byte records (PUT location / REF delta /
  DEL), each with a crc32. Replaying it gives the index; a torn tail record (crash while
  appending) fails its crc and is ignored.
- ``index.snap``: the in-memory table as is (48-byte records + hash slots, crc'd in
  blocks), written via tmp + rename when the log passes 64 MiB and by ``gc``; the log
  then restarts empty with the snapshot's generation. Opening = load snapshot + replay.
- ``lock``: ``flock``-ed around every change, so processes can share a store.
- ``users``: ``flock``-ed shared by every open store, exclusive by a reference
  recount (``fsck --repair``), which must not race an operation elsewhere.
- ``pending/``, ``ingests/``: reference journals of unfinished operations (gc
  releases those of dead processes) and the records of ingests (see
  :mod:`~stellarium_core.nebula.pending`).
- ``DAMAGED``: written when loading finds index entries lost; ``gc`` refuses to
  run until ``fsck --repair`` has rebuilt the index and recounted references.

Durability order for an insert: chunk bytes to the pack, fsync pack, append index
records, fsync index, then return. A crash in between leaves unindexed pack bytes,
which ``fsck`` reports as harmless leftovers and ``gc`` reclaims.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import lz4.block

from stellarium_core.errors import UsageError
from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.hookspecs import Chunker, Hasher
from stellarium_core.nebula.errors import ChunkError, CorruptChunkError, MissingChunkError
from stellarium_core.nebula.pending import RefJournal
from stellarium_core.nebula.table import COMPRESSED, MAX_LEN, PAGE, RECORD, ChunkTable, Entry

LOG_MAGIC = b"NEBLOG1\0"
LOG_HEADER = struct.Struct("<8sII")          # magic, digest size, generation
SNAP_MAGIC = b"NEBSNAP1"
SNAP_HEADER = struct.Struct("<8sQQQ")         # magic, generation, records, slots (+ crc32)
SNAP_BLOCK = 4096                             # records per crc'd block
#: Fold the log into a snapshot once it grows past this (a snapshot loads ~30x faster).
COMPACT_LOG_BYTES = 64 << 20
LOG_REC = struct.Struct("<BBHIIIi32s")        # kind, flags, pack, page, stored, raw, delta, digest
LOG_SIZE = LOG_REC.size + 4                   # + crc32
LOG_FULL = struct.Struct(LOG_REC.format + "I")
PUT, REF, DEL = 1, 2, 3
TRAILER_MAGIC = b"NEBCHNK\x01"
TRAILER = struct.Struct("<8s32sIIB3x")        # magic, digest, stored, raw, flags
TRAILER_SIZE = TRAILER.size + 4               # + crc32
PACK_MAX = 1 << 30
BATCH_BYTES = 64 << 20
WHOLE_FILE = 64 << 20    # files up to this are read in one go, larger ones in windows
META = "nebula.json"
DAMAGED = "DAMAGED"
PENDING = "pending"
_PACK_RE = re.compile(r"pack-(\d{6})\.dat$")
_ZEROS = bytes(PAGE)


def align(n: int) -> int:
    """``n`` rounded up to the page size: where the next chunk in a pack may start."""
    return (n + PAGE - 1) & ~(PAGE - 1)


def pack_name(n: int) -> str:
    return f"pack-{n:06d}.dat"


def log_record(kind: int, digest: bytes, pack: int = 0, offset: int = 0, stored: int = 0,
               raw: int = 0, delta: int = 0, flags: int = 0) -> bytes:
    body = LOG_REC.pack(kind, flags, pack, offset // PAGE, stored, raw, delta, digest)
    return body + zlib.crc32(body).to_bytes(4, "little")


def trailer(digest: bytes, stored: int, raw: int, flags: int) -> bytes:
    body = TRAILER.pack(TRAILER_MAGIC, digest, stored, raw, flags)
    return body + zlib.crc32(body).to_bytes(4, "little")


def parse_trailer(buf: bytes | memoryview) -> tuple[bytes, int, int, int] | None:
    """(digest, stored, raw, flags) of a valid trailer, else None."""
    if len(buf) < TRAILER_SIZE:
        return None
    body = bytes(buf[:TRAILER.size])
    if zlib.crc32(body) != int.from_bytes(buf[TRAILER.size:TRAILER_SIZE], "little"):
        return None
    magic, digest, stored, raw, flags = TRAILER.unpack(body)
    return (digest, stored, raw, flags) if magic == TRAILER_MAGIC else None


class _Pending:
    """A chunk hashed but not yet durable: its bytes and the references to add.

    ``flags`` is None while ``data`` is still the raw bytes of a chunk the store
    already had (a dedup hit); they are kept in case a concurrent gc drops that
    chunk before our commit, so it can be written after all.
    """

    __slots__ = ("data", "raw", "flags", "refs")

    def __init__(self, data: bytes | memoryview, raw: int, flags: int | None) -> None:
        self.data, self.raw, self.flags, self.refs = data, raw, flags, 1


class Batch:
    """Chunks added here become durable together at :meth:`commit` (one fsync pair).

    Digests returned before ``commit`` must not be handed out as stored, and buffers
    given to ``put`` must not change until then. Used by ``put_stream`` and by
    ingest of many small files, where per-file fsyncs would dominate the time.
    """

    def __init__(self, store: ChunkStore, limit: int = BATCH_BYTES,
                 journal: RefJournal | None = None) -> None:
        self._store = store
        self._limit = limit
        self._journal = journal
        self._new: dict[bytes, _Pending] = {}
        self._refs: dict[bytes, _Pending] = {}
        self._bytes = 0
        self._durable: dict[bytes, int] = {}
        self._chunker: Chunker | None = None
        self._floor = 0

    def put(self, data: bytes | memoryview) -> bytes:
        """Hash ``data`` and queue it (or a reference to it); returns its digest."""
        s = self._store
        n = len(data)
        if n > MAX_LEN:
            raise ChunkError(f"chunk of {n} bytes is larger than the store's limit {MAX_LEN}")
        digest = s._digest(data)
        p = self._new.get(digest) or self._refs.get(digest)
        if p is not None:
            p.refs += 1
            return digest
        if s._known(digest):
            self._refs[digest] = _Pending(data, n, None)
            self._bytes += n
        else:
            stored, flags = s._compress(data)
            self._new[digest] = _Pending(stored, n, flags)
            self._bytes += n
        if self._bytes >= self._limit:
            self.commit()
        return digest

    def put_stream(self, src: str | os.PathLike[str] | IO[bytes],
                   chunker: Chunker) -> list[tuple[bytes, int]]:
        """Chunk a file (path) or binary file object and queue every chunk."""
        if chunker is not self._chunker:
            self._chunker, self._floor = chunker, _min_chunk(chunker)
        return [(self.put(c), len(c)) for c in _chunks(src, chunker, self._floor)]

    def commit(self) -> None:
        """Make everything queued durable; afterwards the batch is empty and reusable."""
        new, refs = self._new, self._refs
        self._new, self._refs, self._bytes = {}, {}, 0
        if new or refs:
            self._store._commit(new, refs)
            counts = {d: p.refs for d, p in new.items()}
            for d, p in refs.items():
                counts[d] = counts.get(d, 0) + p.refs
            durable = self._durable
            for d, n in counts.items():
                durable[d] = durable.get(d, 0) + n
            if self._journal is not None:
                self._journal.record(counts)

    def abandon(self) -> None:
        """Drop what is queued; what earlier commits made durable stays."""
        self._new, self._refs, self._bytes = {}, {}, 0

    def rollback(self) -> None:
        """Drop what is queued and release every reference this batch made durable.

        Best effort: it runs while another error propagates, and if the release fails
        too (disk still full) the chunks merely keep extra references. The batch's
        journal is dropped first, so its references are never released twice.
        """
        self.abandon()
        if self._journal is not None:
            self._journal.settle()  # first: a crash now leaks, never releases twice
        durable, self._durable = self._durable, {}
        if durable:
            try:
                self._store._release_many(durable)
            except ChunkError:
                pass

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _min_chunk(chunker: Chunker) -> int:
    """Length up to which ``chunker`` cannot cut: FastCDC's ``min_size``, else 0."""
    floor = chunker.params.get("min_size", 0)
    return floor if isinstance(floor, int) else 0


def _chunks(src: str | os.PathLike[str] | IO[bytes], chunker: Chunker,
            floor: int = 0) -> Iterator[memoryview]:
    """Chunks of a path or a binary file object.

    Files are read (not mmap'd): what gets hashed is then exactly what gets stored,
    even if someone rewrites or truncates the file meanwhile (an mmap would give
    torn chunks or SIGBUS). Files up to 64 MiB are read whole, larger ones in windows.
    A file no longer than ``floor`` (the chunker's minimum chunk) is one chunk.
    """
    if not isinstance(src, (str, os.PathLike)):
        yield from _windows(src.read, chunker, src)
        return
    try:
        fd = os.open(src, os.O_RDONLY)
    except OSError as exc:
        raise ChunkError(f"cannot read {src}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size > WHOLE_FILE:
            left = size

            def read(n: int) -> bytes:  # at most ``size`` bytes: a growing file has no end
                nonlocal left
                data = os.read(fd, min(n, left)) if left else b""
                left -= len(data)
                if not left and os.pread(fd, 1, size):
                    raise ChunkError(f"{src} grew while being read (it was {size} bytes)")
                return data

            yield from _windows(read, chunker, src)
            return
        try:
            buf = memoryview(os.pread(fd, size, 0))
        except OSError as exc:
            raise ChunkError(f"cannot read {src}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if not buf:
        return
    if len(buf) <= floor:  # most files of a rootfs: one chunk, no cut call
        yield buf
        return
    pos = 0
    for n in chunker.cut(buf):
        yield buf[pos:pos + n]
        pos += n


def _windows(read: Callable[[int], bytes], chunker: Chunker,
             name: object) -> Iterator[memoryview]:
    """Chunks of a stream read in windows, cut exactly as if it were read whole."""
    window = max(8 << 20, 4 * chunker.max_size)
    carry = b""
    while True:
        try:
            data = read(window)
        except OSError as exc:
            raise ChunkError(f"cannot read {name}: {exc.strerror or exc}") from None
        eof = not data
        buf = memoryview(carry + data if carry else data) if not eof else memoryview(carry)
        if not len(buf):
            return
        pos = 0
        for n in chunker.cut(buf):
            # A cut is final once max_size bytes past the chunk start are in the buffer.
            if not eof and pos + chunker.max_size > len(buf):
                break
            yield buf[pos:pos + n]
            pos += n
        if eof:
            return
        carry = bytes(buf[pos:])


class ChunkStore:
    """Chunks by digest: put (insert-or-reference), get/view, refs, gc, fsck, stats."""

    def __init__(self, root: Path, hasher: Hasher, compression: str, verify_reads: bool,
                 on_stored: Callable[[bytes, int, bool], None] | None,
                 pack_max: int) -> None:
        self.root = root
        self.hasher = hasher
        self.compression = compression
        self.verify_reads = verify_reads
        self.pack_max = pack_max
        self._on_stored = on_stored
        self._digest = hasher.digest
        self._mu = threading.RLock()
        self._table = ChunkTable()
        self._maps: dict[int, mmap.mmap] = {}
        self._pack_fds: dict[int, int] = {}
        self._lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        # Every open holds this shared; a recount of references needs it exclusive
        # (see :meth:`exclusive`), so it never races an operation in another process.
        self._users_fd = os.open(root / "users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)
        self._log_fd = -1
        self._log_ino = -1
        self._log_pos = 0
        #: (file, byte offset, what) for damage seen while loading the index, for fsck
        self.log_damage: list[tuple[str, int, str]] = []
        self._snap_gen = 0
        self._log_stale = False
        self.compact_log_bytes = COMPACT_LOG_BYTES
        self._locked = 0
        self._marked = False
        with self._mu:
            self._catch_up()

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike[str], hasher: Hasher, *, compression: str = "lz4",
             verify_reads: bool = True, create: bool = False,
             on_stored: Callable[[bytes, int, bool], None] | None = None,
             pack_max: int = PACK_MAX, check_meta: bool = True) -> ChunkStore:
        """Open the store at ``root``; ``create`` makes the layout if it is absent.

        ``check_meta=False`` opens a store whose ``nebula.json`` is damaged (fsck
        does, to say what else is wrong and to rewrite it under ``--repair``).
        """
        root = Path(root)
        if compression not in ("lz4", "none"):
            raise UsageError(f"compression must be lz4 or none, got {compression!r}")
        if hasher.digest_size != 32:
            raise UsageError(f"the chunk store needs a 32-byte digest; hasher {hasher.name!r} "
                             f"gives {hasher.digest_size} bytes")
        if not (root / META).exists() and not (root / "index.log").exists():
            if not create:
                raise ChunkError(f"no chunk store at {root} (run `stellar host init`)")
            cls._create(root, hasher)
        problem = cls.meta_problem(root, hasher)
        if problem and check_meta:
            raise ChunkError(f"{root / META}: {problem} (`stellar fsck --repair` rewrites it)")
        return cls(root, hasher, compression, verify_reads, on_stored, pack_max)

    @staticmethod
    def meta_problem(root: Path, hasher: Hasher) -> str | None:
        """What is wrong with ``nebula.json``, or None; a store of another hasher is a
        UsageError (its chunk identities cannot change)."""
        try:
            meta = json.loads((root / META).read_bytes())
        except FileNotFoundError:
            return "the store metadata is missing"
        except (OSError, ValueError, RecursionError) as exc:
            return f"unreadable store metadata: {exc}"
        if not isinstance(meta, dict) or not isinstance(meta.get("hasher"), str):
            return "damaged store metadata: expected {\"format\": 1, \"hasher\": NAME}"
        if meta["hasher"] != hasher.name:
            raise UsageError(f"store {root} holds chunks hashed with {meta['hasher']!r}, "
                             f"not {hasher.name!r}; chunk identities cannot change")
        return None

    @staticmethod
    def write_meta(root: Path, hasher: Hasher) -> None:
        write_atomic(root / META, (json.dumps({"format": 1, "hasher": hasher.name})
                                   + "\n").encode())

    @staticmethod
    def _create(root: Path, hasher: Hasher) -> None:
        (root / "packs").mkdir(parents=True, exist_ok=True)
        log = root / "index.log"
        if not log.exists():
            write_atomic(log, LOG_HEADER.pack(LOG_MAGIC, 32, 0))
        ChunkStore.write_meta(root, hasher)
        fsync_dir(root / "packs")

    # -- the index log ---------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.root / "index.log"

    @property
    def snap_path(self) -> Path:
        return self.root / "index.snap"

    def _read_snapshot(self) -> tuple[int, ChunkTable]:
        """(generation, table) from ``index.snap``; (0, empty) when there is none.

        Records are crc'd in blocks: a damaged block loses only its own entries
        (noted in ``log_damage``; ``fsck --repair`` re-indexes them from the packs).
        """
        try:
            data = self.snap_path.read_bytes()
        except FileNotFoundError:
            return 0, ChunkTable()
        except OSError as exc:
            raise ChunkError(f"{self.snap_path}: cannot read the index: {exc.strerror}") from None
        hs = SNAP_HEADER.size
        head = data[:hs]
        if (len(data) < hs + 4 or zlib.crc32(head) != int.from_bytes(data[hs:hs + 4], "little")
                or SNAP_HEADER.unpack(head)[0] != SNAP_MAGIC):
            self.log_damage.append(("index.snap", 0, "header is damaged: every index entry "
                                    "it held is lost (the chunks stay in the packs)"))
            return 0, ChunkTable()
        _, gen, count, nslots = SNAP_HEADER.unpack(head)
        nblocks = -(-count // SNAP_BLOCK)
        want = hs + 4 + count * RECORD + 4 * nblocks + 4 * nslots + 4
        if len(data) != want:
            self.log_damage.append(("index.snap", 0, f"is {len(data)} bytes, its header says "
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
        if not bad and slots_ok:
            return gen, ChunkTable.load(recs, slots)
        keep = bytearray()
        for i in range(nblocks):
            if i in bad:
                self.log_damage.append((
                    "index.snap", hs + 4 + i * size,
                    f"snapshot records {i * SNAP_BLOCK}..{min(count, (i + 1) * SNAP_BLOCK) - 1}"
                    " fail their checksum (those index entries are lost)"))
            else:
                keep += recs[i * size:(i + 1) * size]
        return gen, ChunkTable.load(keep, None)

    def _reload(self) -> None:
        """Load snapshot + log from scratch (first open, or another process compacted)."""
        shared = self._locked == 0 and self._lock_fd >= 0
        if shared:  # a compaction swaps two files: never read them half-swapped
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
        try:
            self.log_damage = []
            gen, table = self._read_snapshot()
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            self._table, self._snap_gen = table, gen
            try:
                fd = os.open(self.log_path, os.O_RDWR)
            except FileNotFoundError:
                # The next writer starts a new log; fsck --repair re-indexes from the packs.
                self.log_damage.append(("index.log", 0, "is missing: every index record "
                                        "since the snapshot is lost"))
                self._log_ino, self._log_pos, self._log_stale = 0, 0, True
                return
            except OSError as exc:
                raise ChunkError(f"{self.log_path}: cannot open the index: "
                                 f"{exc.strerror}") from None
            head = os.pread(fd, LOG_HEADER.size, 0)
            self._log_fd, self._log_ino = fd, os.fstat(fd).st_ino
            self._log_pos = LOG_HEADER.size
            if len(head) < LOG_HEADER.size or LOG_HEADER.unpack(head)[0] != LOG_MAGIC:
                self.log_damage.append(("index.log", 0, "header is damaged: every index "
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
                self.log_damage.append((
                    "index.snap", 0, f"snapshot generation {gen} is older than the log's "
                    f"({log_gen}): the snapshot was lost or replaced"))
        finally:
            if shared:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Apply records other processes appended (or reload after a compaction)."""
        try:
            ino = os.stat(self.log_path).st_ino
        except FileNotFoundError:
            ino = 0
        except OSError as exc:
            raise ChunkError(f"{self.log_path}: cannot read the index: {exc.strerror}") from None
        if ino != self._log_ino:
            self._reload()
        if self.log_damage and not self._marked:
            self._mark_damaged()
        if self._log_stale:
            return
        size = os.fstat(self._log_fd).st_size
        if size <= self._log_pos:
            return
        data = os.pread(self._log_fd, size - self._log_pos, self._log_pos)
        self._log_pos += self._apply(data, self._log_pos)

    @property
    def damage_path(self) -> Path:
        return self.root / DAMAGED

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
        text = "".join(f"{f} @{off}: {what}\n" for f, off, what in self.log_damage)
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

    def _write_log(self, gen: int) -> None:
        """Start a fresh, empty log of generation ``gen`` (tmp + rename; caller holds the lock)."""
        write_atomic(self.log_path, LOG_HEADER.pack(LOG_MAGIC, 32, gen))
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd = os.open(self.log_path, os.O_RDWR)
        self._log_ino = os.fstat(self._log_fd).st_ino
        self._log_pos, self._log_stale = LOG_HEADER.size, False

    def compact_index(self) -> None:
        """Fold the log into a new snapshot (caller holds the lock).

        Order: snapshot of generation G+1 (tmp, fsync, rename), then an empty log of
        G+1. A crash between leaves a G log that loaders know to skip.
        """
        gen = self._snap_gen + 1
        recs, slots = self._table.dump()
        count = len(recs) // RECORD
        size = SNAP_BLOCK * RECORD
        view = memoryview(recs)
        crcs = [zlib.crc32(view[i:i + size]) for i in range(0, len(recs), size)]
        head = SNAP_HEADER.pack(SNAP_MAGIC, gen, count, len(slots) // 4)
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

    def _apply(self, data: bytes, base: int) -> int:
        """Apply whole valid records; returns bytes consumed (a bad tail is left alone).

        A record that fails its crc but is followed by valid ones is damage, not a torn
        write: it is skipped and noted in ``log_damage`` for fsck.
        """
        table = self._table
        view = memoryview(data)
        n = len(data) - len(data) % LOG_SIZE
        good_end = 0
        bad: list[int] = []
        crc32, body_size = zlib.crc32, LOG_REC.size
        o = -LOG_SIZE
        for kind, flags, pack, page, stored, raw, delta, digest, crc in \
                LOG_FULL.iter_unpack(view[:n]):
            o += LOG_SIZE
            if crc32(view[o:o + body_size]) != crc:
                bad.append(o)
                continue
            if bad:
                for b in bad:
                    self.log_damage.append(
                        ("index.log", base + b,
                         "record fails its checksum (that index record is lost)"))
                bad = []
            if kind == PUT:
                table.upsert(digest, pack, page, stored, raw, delta, flags)
            elif kind == REF:
                try:
                    table.add_refs(digest, delta)
                except KeyError:
                    self.log_damage.append(("index.log", base + o,
                                            f"reference to unknown chunk {digest.hex()}"))
            elif kind == DEL:
                table.delete(digest)
            else:
                self.log_damage.append(("index.log", base + o, f"unknown record kind {kind}"))
            good_end = o + LOG_SIZE
        return good_end

    def _append_log(self, records: list[bytes],
                    apply: Callable[[], None] | None = None) -> None:
        """Append and fsync records (caller holds the lock); undone on failure.

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

    # -- locking -------------------------------------------------------------------

    def _lock(self, writing: bool = True) -> _Locked:
        return _Locked(self, writing)

    def _ready_to_append(self) -> None:
        """Under the lock nobody is mid-append: drop a torn tail, replace a stale log."""
        if self._log_stale:
            self._write_log(self._snap_gen)
            return
        size = os.fstat(self._log_fd).st_size
        if size > self._log_pos:
            os.ftruncate(self._log_fd, self._log_pos)
            os.fdatasync(self._log_fd)

    # -- packs -----------------------------------------------------------------------

    def pack_path(self, n: int) -> Path:
        return self.root / "packs" / pack_name(n)

    def pack_numbers(self) -> list[int]:
        try:
            names = os.listdir(self.root / "packs")
        except OSError as exc:
            raise ChunkError(f"{self.root / 'packs'}: {exc.strerror}") from None
        return sorted(int(m.group(1)) for m in map(_PACK_RE.match, names) if m)

    def _pack_fd(self, n: int, create: bool = False) -> int:
        fd = self._pack_fds.get(n)
        if fd is None:
            path = self.pack_path(n)
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
            self._pack_fds[n] = fd
            if create:
                fsync_dir(path.parent)
        return fd

    def _write_chunks(self, items: list[tuple[bytes, bytes | memoryview, int, int]],
                      first_pack: int | None = None
                      ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Append chunks (digest, stored bytes, raw len, flags) to packs and fsync them.

        Returns (pack, offset) per item, and (fd, old length) per pack written, for
        :meth:`_cut_back` if the index append then fails. On failure here every pack
        is cut back already, so nothing half-written stays behind.
        """
        packs = self.pack_numbers()
        if first_pack is not None:
            cur = first_pack
        else:
            cur = packs[-1] if packs else 1
        fd = self._pack_fd(cur, create=True)
        start = os.fstat(fd).st_size
        if start >= self.pack_max and start:
            cur += 1
            fd, start = self._pack_fd(cur, create=True), 0
        touched = {cur: (fd, start)}
        out: list[tuple[int, int]] = []
        iov: list[bytes | memoryview] = []
        pos = align(start)
        iov_start = start
        if pos > start:
            iov.append(_ZEROS[:pos - start])
        try:
            for digest, data, raw, flags in items:
                stored = len(data)
                if pos + stored > self.pack_max and pos > 0 and out:
                    self._pwritev(fd, iov, iov_start)
                    cur += 1
                    fd = self._pack_fd(cur, create=True)
                    touched[cur] = (fd, 0)
                    iov, pos, iov_start = [], 0, 0
                out.append((cur, pos))
                iov.append(data)
                iov.append(trailer(digest, stored, raw, flags))
                end = pos + stored + TRAILER_SIZE
                pad = align(end) - end
                if pad:
                    iov.append(_ZEROS[:pad])
                pos = end + pad
            self._pwritev(fd, iov, iov_start)
            for f, _ in touched.values():
                os.fdatasync(f)
        except OSError:
            self._cut_back(list(touched.values()))
            raise
        return out, list(touched.values())

    @staticmethod
    def _cut_back(undo: list[tuple[int, int]]) -> None:
        """Truncate packs to their lengths before a failed write (best effort)."""
        for fd, old in undo:
            try:
                os.ftruncate(fd, old)
            except OSError:
                pass

    @staticmethod
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

    def _map(self, pack: int, end: int) -> mmap.mmap:
        mm = self._maps.get(pack)
        if mm is None or len(mm) < end:
            try:
                fd = os.open(self.pack_path(pack), os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(pack) from None
            try:
                size = os.fstat(fd).st_size
                if size < end:
                    raise CorruptChunkError(
                        f"{self.pack_path(pack)} is truncated: {size} bytes, a chunk "
                        f"needs bytes up to {end}")
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            self._maps[pack] = mm
        return mm

    # -- writing ---------------------------------------------------------------------

    def _known(self, digest: bytes) -> bool:
        with self._mu:
            return digest in self._table

    def _compress(self, data: bytes | memoryview) -> tuple[bytes | memoryview, int]:
        """lz4 a chunk only when that saves at least one page on disk."""
        n = len(data)
        if self.compression != "lz4" or n + TRAILER_SIZE <= PAGE:
            return data, 0
        if n > 3 * PAGE:
            sample = lz4.block.compress(data[:2 * PAGE], store_size=False)
            if len(sample) > 2 * PAGE - PAGE // 16:
                return data, 0
        packed = lz4.block.compress(data, store_size=False)
        if align(len(packed) + TRAILER_SIZE) < align(n + TRAILER_SIZE):
            return packed, COMPRESSED
        return data, 0

    def batch(self, limit: int = BATCH_BYTES, journal: RefJournal | None = None) -> Batch:
        """A :class:`Batch`: many puts, one durable commit (auto-commits every ``limit``
        bytes); each commit's references are also recorded in ``journal``."""
        return Batch(self, limit, journal)

    def pending(self) -> RefJournal:
        """A journal for an operation whose references outlive one batch (see
        :mod:`~stellarium_core.nebula.pending`)."""
        return RefJournal(self.root / PENDING)

    def _commit(self, new: dict[bytes, _Pending], refs: dict[bytes, _Pending]) -> None:
        with self._lock():
            # Another process may have stored some of our new chunks meanwhile, and a
            # gc may have dropped chunks we meant to reference: swap them over.
            for d in [d for d in new if d in self._table]:
                refs[d] = new.pop(d)
            for d in [d for d in refs if d not in self._table]:
                p = new[d] = refs.pop(d)
                if p.flags is None:
                    p.data, p.flags = self._compress(p.data)
            try:
                items = [(d, p.data, p.raw, p.flags) for d, p in new.items()]
                places, undo = self._write_chunks(items) if items else ([], [])
                placed = [(d, pack, off // PAGE, len(data), raw, new[d].refs, flags)
                          for (d, data, raw, flags), (pack, off)
                          in zip(items, places, strict=True)]
                records = [log_record(PUT, d, pack, page * PAGE, stored, raw, n, flags)
                           for d, pack, page, stored, raw, n, flags in placed]
                records += [log_record(REF, d, delta=p.refs) for d, p in refs.items()]

                def apply() -> None:
                    table = self._table
                    for rec in placed:
                        table.upsert(*rec)
                    for d, p in refs.items():
                        table.add_refs(d, p.refs)

                try:
                    self._append_log(records, apply)
                except OSError:
                    self._cut_back(undo)
                    raise
            except OSError as exc:
                raise ChunkError(f"write to the chunk store {self.root} failed: "
                                 f"{exc.strerror or exc}; nothing was added") from None
            log_bytes = self._log_pos - LOG_HEADER.size
            if log_bytes > self.compact_log_bytes:
                try:
                    self.compact_index()
                except OSError:  # the log stays valid; compaction is retried next commit
                    pass
        if self._on_stored is not None:
            for d, p in new.items():
                self._on_stored(d, p.raw, True)
            for d, p in refs.items():
                self._on_stored(d, p.raw, False)

    # -- the public API ----------------------------------------------------------------

    def put(self, data: bytes | memoryview) -> bytes:
        """Store ``data`` if new, else add a reference; +1 ref either way. Durable on return."""
        with self.batch() as b:
            return b.put(data)

    def put_stream(self, src: str | os.PathLike[str] | IO[bytes],
                   chunker: Chunker) -> list[tuple[bytes, int]]:
        """Chunk and store a file or stream; [(digest, length)] once all is durable."""
        with self.batch() as b:
            return b.put_stream(src, chunker)

    def _entry(self, digest: bytes) -> Entry:
        with self._mu:
            e = self._table.get(digest)
            if e is None:
                self._catch_up()
                e = self._table.get(digest)
        if e is None:
            raise MissingChunkError(f"chunk {digest.hex()} is not in the store")
        return e

    def contains(self, digest: bytes) -> bool:
        try:
            self._entry(digest)
        except MissingChunkError:
            return False
        return True

    __contains__ = contains

    def size(self, digest: bytes) -> int:
        """Uncompressed length of a stored chunk."""
        return self._entry(digest).raw

    def refs(self, digest: bytes) -> int:
        return self._entry(digest).refs

    def entry(self, digest: bytes) -> Entry:
        """Where and how the chunk is stored (pack, offset, lengths, refs, flags)."""
        return self._entry(digest)

    def _stored_view(self, digest: bytes, e: Entry) -> memoryview:
        for attempt in (0, 1):
            try:
                with self._mu:
                    mm = self._map(e.pack, e.offset + e.stored)
                return memoryview(mm)[e.offset:e.offset + e.stored]
            except FileNotFoundError:
                if attempt == 0:  # a gc may have moved it: re-read the index once
                    with self._mu:
                        self._catch_up()
                    e = self._entry(digest)
        raise CorruptChunkError(f"chunk {digest.hex()} is unreadable: "
                                f"{self.pack_path(e.pack)} is missing")

    def _check(self, digest: bytes, data: bytes | memoryview, e: Entry) -> None:
        if self._digest(data) != digest:
            raise CorruptChunkError(
                f"chunk {digest.hex()} is corrupt: its bytes in {self.pack_path(e.pack)} at "
                f"offset {e.offset} no longer hash to its digest")

    def get(self, digest: bytes) -> bytes:
        """The chunk's bytes, verified unless ``verify_reads`` is off."""
        e = self._entry(digest)
        raw = self._stored_view(digest, e)
        if e.compressed:
            try:
                data = lz4.block.decompress(raw, uncompressed_size=e.raw)
            except lz4.block.LZ4BlockError:
                raise CorruptChunkError(
                    f"chunk {digest.hex()} is corrupt: its lz4 bytes in "
                    f"{self.pack_path(e.pack)} at offset {e.offset} do not decompress") from None
            if len(data) != e.raw:
                raise CorruptChunkError(f"chunk {digest.hex()} is corrupt: decompressed to "
                                        f"{len(data)} bytes, expected {e.raw}")
        else:
            data = bytes(raw)
        if self.verify_reads:
            self._check(digest, data, e)
        return data

    def view(self, digest: bytes) -> memoryview:
        """Zero-copy view over the pack's mmap for uncompressed chunks; else a copy's view."""
        e = self._entry(digest)
        if e.compressed:
            return memoryview(self.get(digest))
        mv = self._stored_view(digest, e)
        if self.verify_reads:
            self._check(digest, mv, e)
        return mv

    def _ref_deltas(self, deltas: Mapping[bytes, int]) -> None:
        """Apply reference changes in one durable append: all of them or, if any chunk
        is missing or would drop below zero, none."""
        with self._lock():
            records = []
            for digest, n in deltas.items():
                e = self._table.get(digest)
                if e is None:
                    raise MissingChunkError(f"chunk {digest.hex()} is not in the store")
                if n < 0 and e.refs < -n:
                    raise ChunkError(f"chunk {digest.hex()} has {e.refs} references; "
                                     f"cannot release {-n}")
                records.append(log_record(REF, digest, delta=n))
            if not records:
                return
            try:
                self._append_log(records)
            except OSError as exc:
                raise ChunkError(f"updating references in {self.root} failed: "
                                 f"{exc.strerror}") from None

    @staticmethod
    def _counts(counts: Mapping[bytes, int], what: str) -> dict[bytes, int]:
        bad = [n for n in counts.values() if n < 0]
        if bad:
            raise UsageError(f"{what} count must not be negative, got {bad[0]}")
        return {d: n for d, n in counts.items() if n}

    def _release_many(self, counts: dict[bytes, int]) -> None:
        """Undo references in one durable append (chunks at 0 refs wait for gc)."""
        with self._lock():
            records = []
            for d, n in counts.items():
                e = self._table.get(d)
                if e is not None and e.refs:
                    records.append(log_record(REF, d, delta=-min(n, e.refs)))
            try:
                self._append_log(records)
            except OSError as exc:
                raise ChunkError(f"releasing references in {self.root} failed: "
                                 f"{exc.strerror}") from None

    def ref(self, digest: bytes, n: int = 1) -> None:
        """Add ``n`` references to a stored chunk."""
        if n < 1:
            raise UsageError(f"ref count must be positive, got {n}")
        self._ref_deltas({digest: n})

    def release(self, digest: bytes, n: int = 1) -> None:
        """Drop ``n`` references; at zero the chunk waits for :meth:`gc`."""
        if n < 1:
            raise UsageError(f"release count must be positive, got {n}")
        self._ref_deltas({digest: -n})

    def ref_many(self, counts: Mapping[bytes, int]) -> None:
        """Add ``counts[d]`` references to each stored chunk ``d`` with one fsync.

        All or nothing: if a chunk is missing, no reference is added. For manifests
        that list thousands of chunks (clones, image layers), where a :meth:`ref`
        per chunk would cost a durable commit each.
        """
        self._ref_deltas(self._counts(counts, "ref"))

    def release_many(self, counts: Mapping[bytes, int]) -> None:
        """Drop ``counts[d]`` references from each chunk with one fsync; all or nothing."""
        self._ref_deltas({d: -n for d, n in self._counts(counts, "release").items()})

    def __len__(self) -> int:
        with self._mu:
            self._catch_up()
            return len(self._table)

    def digests(self) -> list[bytes]:
        with self._mu:
            self._catch_up()
            return [d for d, _ in self._table.items()]

    def items(self) -> list[tuple[bytes, Entry]]:
        with self._mu:
            self._catch_up()
            return list(self._table.items())

    def stats(self) -> dict[str, Any]:
        """Logical, unique and stored bytes, chunk count, dedup ratio, compression savings."""
        logical = unique = stored = compressed = 0
        count = 0
        for _, e in self.items():
            count += 1
            logical += e.raw * e.refs
            unique += e.raw
            stored += e.stored
            compressed += e.compressed
        pack_bytes = 0
        for n in self.pack_numbers():
            try:
                pack_bytes += self.pack_path(n).stat().st_size
            except OSError:
                pass
        return {
            "chunks": count,
            "logical_bytes": logical,
            "unique_bytes": unique,
            "stored_bytes": stored,
            "pack_bytes": pack_bytes,
            "dedup_ratio": round(logical / unique, 4) if unique else 1.0,
            "compressed_chunks": compressed,
            "compression_saved_bytes": unique - stored,
            "index_memory_bytes": self._table.nbytes(),
        }

    def gc(self, keep: Callable[[], Collection[bytes]] | None = None) -> dict[str, int]:
        """Release what dead operations' journals hold, drop unreferenced chunks (never
        one ``keep()`` names: asked after that release), rewrite packs with garbage,
        compact the index."""
        from stellarium_core.nebula.maintenance import collect
        try:
            return collect(self, keep)
        except OSError as exc:
            raise ChunkError(f"gc of {self.root} stopped: {exc.strerror or exc} "
                             f"({exc.filename or 'pack or index'}); what it did so far "
                             "is consistent, run it again when the cause is fixed") from None

    def fsck(self, repair: bool = False, held: Mapping[bytes, int] | None = None,
             complete: bool = True) -> Any:
        """Re-hash every chunk and cross-check index and packs (see ``maintenance.fsck``);
        with ``held`` (references every holder accounts for) also the reference counts."""
        from stellarium_core.nebula.maintenance import fsck
        try:
            return fsck(self, repair=repair, held=held, complete=complete)
        except OSError as exc:
            raise ChunkError(f"fsck of {self.root} could not read "
                             f"{exc.filename or 'the store'}: {exc.strerror or exc}") from None

    @contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Whether no other process has the store open; while True, none can open it.

        A recount of references is only sound when no operation is between taking
        references and writing the manifest that holds them.
        """
        try:
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._users_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        with self._mu:
            for mm in self._maps.values():
                try:
                    mm.close()
                except BufferError:  # a caller still holds a view; let it live
                    pass
            self._maps.clear()
            for fd in self._pack_fds.values():
                os.close(fd)
            self._pack_fds.clear()
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            if self._users_fd >= 0:
                os.close(self._users_fd)
                self._users_fd = -1

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


class _Locked:
    """Thread mutex + exclusive ``flock`` on the store, with the index caught up."""

    def __init__(self, store: ChunkStore, writing: bool) -> None:
        self.s = store
        self.writing = writing

    def __enter__(self) -> ChunkStore:
        s = self.s
        s._mu.acquire()
        try:
            if s._locked == 0:
                fcntl.flock(s._lock_fd, fcntl.LOCK_EX)
        except BaseException:
            s._mu.release()
            raise
        s._locked += 1
        try:
            s._catch_up()
            if self.writing:
                s._ready_to_append()
        except BaseException:
            self.__exit__()
            raise
        return s

    def __exit__(self, *_: Any) -> None:
        s = self.s
        s._locked -= 1
        if s._locked == 0:
            fcntl.flock(s._lock_fd, fcntl.LOCK_UN)
        s._mu.release()
