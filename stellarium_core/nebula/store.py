"""NEBULA: the content-addressed chunk store, as one facade.

:class:`ChunkStore` puts chunks (insert-or-reference), reads them back verified,
hands out mappable ones, counts references, and runs gc and fsck. The concerns
behind it have their own modules: the byte layouts (:mod:`.format`, which also
describes the files), the index log and snapshots with the store lock
(:mod:`.index`), pack files (:mod:`.packs`), batches and the write protocol
(:mod:`.batch`), reading files and streams into chunks (:mod:`.chunking`) and
cutting them in worker processes (:mod:`.workers`), mappings and their leases
(:mod:`.mapping`), and gc/fsck (:mod:`.maintenance`), which uses only the public
members of this class and of its ``index`` and ``packs``.

Durability order for an insert: chunk bytes to the pack, fsync pack, append index
records, fsync index, then return.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from stellarium_core.compression import NONE, Compressors
from stellarium_core.errors import PluginError, UsageError
from stellarium_core.fsutil import fsync_dir
from stellarium_core.hookspecs import Chunker, Compressor, Hasher
from stellarium_core.nebula import format as fmt
from stellarium_core.nebula.batch import BATCH_BYTES, Batch
from stellarium_core.nebula.chunking import Source
from stellarium_core.nebula.errors import (
    ChunkError,
    CorruptChunkError,
    MissingChunkError,
    MissingCompressorError,
)
from stellarium_core.nebula.format import META, REF, align, codec_field, log_record
from stellarium_core.nebula.index import Index
from stellarium_core.nebula.mapping import ChunkMapping, Leases, NotMappableError
from stellarium_core.nebula.packs import PACK_MAX, Packs
from stellarium_core.nebula.pending import PENDING, RefJournal
from stellarium_core.nebula.table import PAGE, UNIT, Entry
from stellarium_core.nebula.verified import VerifiedLog

#: Fold the log into a snapshot once it grows past this (a snapshot loads ~30x faster),
#: or past the snapshot's own size once over ``COMPACT_LOG_FLOOR``: reference records
#: of chunks stored long ago (an ingest of a tree much like one before) would
#: otherwise make the log several times the index it describes.
COMPACT_LOG_BYTES = 64 << 20
COMPACT_LOG_FLOOR = 256 << 10


class ChunkStore:
    """Chunks by digest: put (insert-or-reference), get/view, refs, gc, fsck, stats."""

    def __init__(self, root: Path, hasher: Hasher, compressor: Compressor | None,
                 compressors: Compressors, verify_reads: bool,
                 on_stored: Callable[[bytes, int, bool], None] | None,
                 pack_max: int) -> None:
        self.root = root
        self.hasher = hasher
        #: What new chunks are compressed with (None: stored raw).
        self.compressor = compressor
        #: Compressors by name, for reading what any compressor wrote.
        self.compressors = compressors
        self.verify_reads = verify_reads
        #: Called (digest, raw size, new) for every chunk a commit stored or referenced.
        self.on_stored = on_stored
        self.compact_log_bytes = COMPACT_LOG_BYTES
        self._digest = hasher.digest
        self.packs = Packs(root, pack_max)
        self.index = Index(root)
        self._leases = Leases(self.packs.lease)
        self._verified = VerifiedLog(root)    # mapped chunks some process checked
        # Every open holds this shared; a recount of references needs it exclusive
        # (see :meth:`exclusive`), so it never races an operation in another process.
        self._users_fd = os.open(root / "users", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._users_fd, fcntl.LOCK_SH)

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike[str], hasher: Hasher, *,
             compression: str | Compressor = "lz4", verify_reads: bool = True,
             create: bool = False,
             on_stored: Callable[[bytes, int, bool], None] | None = None,
             pack_max: int = PACK_MAX, check_meta: bool = True,
             compressors: Compressors | None = None) -> ChunkStore:
        """Open the store at ``root``; ``create`` makes the layout if it is absent.

        New chunks are compressed with ``compression``: an installed compressor's
        name (default parameters), a compressor, or ``"none"``. Chunks are read
        with whichever compressor their record names, found in ``compressors``
        (default: any installed one, loaded on first use).
        ``check_meta=False`` opens a store whose ``nebula.json`` is damaged (fsck
        does, to say what else is wrong and to rewrite it under ``--repair``).
        """
        root = Path(root)
        compressor = None if compression == NONE else compression
        if isinstance(compressor, str):
            try:
                compressor = Compressors()(compressor)
            except PluginError as exc:
                raise UsageError(f"compression: {exc}") from None
        if compressor is not None:
            try:
                codec_field(compressor.name)
            except ValueError:
                raise UsageError(f"compressor {compressor.name!r}: chunk records hold a "
                                 "compressor's name in at most 7 ASCII bytes") from None
        if not 0 < pack_max <= PACK_MAX:
            raise UsageError(f"pack_max must be 1..{PACK_MAX}, got {pack_max}")
        if hasher.digest_size != 32:
            raise UsageError(f"the chunk store needs a 32-byte digest; hasher {hasher.name!r} "
                             f"gives {hasher.digest_size} bytes")
        if not (root / META).exists() and not (root / "index.log").exists():
            if not create:
                raise ChunkError(f"no chunk store at {root} (run `stellar host init`)")
            (root / "packs").mkdir(parents=True, exist_ok=True)
            Index.create(root)
            fmt.write_meta(root, hasher)
            fsync_dir(root / "packs")
        problem = fmt.meta_problem(root, hasher)
        if problem and check_meta:
            raise ChunkError(f"{root / META}: {problem} (`stellar fsck --repair` rewrites it)")
        return cls(root, hasher, compressor, compressors or Compressors(compressor),
                   verify_reads, on_stored, pack_max)

    meta_problem = staticmethod(fmt.meta_problem)
    write_meta = staticmethod(fmt.write_meta)

    # -- the parts, for maintenance and tests ------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.index.log_path

    @property
    def snap_path(self) -> Path:
        return self.index.snap_path

    @property
    def damage_path(self) -> Path:
        return self.index.damage_path

    @property
    def log_damage(self) -> list[tuple[str, int, str]]:
        """(file, byte offset, what) for damage seen while loading the index."""
        return self.index.damage

    def damaged(self) -> list[str]:
        """Index damage found by any opener and not yet repaired (``DAMAGED``)."""
        return self.index.damaged()

    def lock(self, writing: bool = True) -> AbstractContextManager[None]:
        """The store lock (reentrant), with the index caught up (see :meth:`Index.locked`)."""
        return self.index.locked(writing)

    def log_outgrown(self) -> bool:
        """Whether the index log should be folded into a snapshot (see
        :data:`COMPACT_LOG_BYTES`)."""
        limit = max(COMPACT_LOG_FLOOR, self.index.table.nbytes())
        return self.index.log_bytes > min(self.compact_log_bytes, limit)

    def compact_index(self) -> None:
        """Fold the index log into a new snapshot (caller holds :meth:`lock`)."""
        self.index.compact()

    def pack_path(self, n: int) -> Path:
        return self.packs.path(n)

    def pack_numbers(self) -> list[int]:
        return self.packs.numbers()

    # -- writing ---------------------------------------------------------------------

    def indexed(self, digest: bytes, mappable: bool = False) -> bool:
        """Whether this process's index has the chunk (stored mappable, if asked): a
        hint for writers (a commit re-checks under the lock), so it neither catches
        up with other processes nor waits for a commit in progress (False then)."""
        mu = self.index.mu
        if not mu.acquire(blocking=False):
            return False
        try:
            if not mappable:
                return digest in self.index.table
            e = self.index.table.get(digest)
            return e is not None and e.mappable
        finally:
            mu.release()

    def compress(self, data: bytes | memoryview) -> tuple[bytes | memoryview, str]:
        """(stored bytes, compressor name or ""): compressed when that saves at least one
        64-byte unit of pack space."""
        c = self.compressor
        n = len(data)
        if c is None or n <= UNIT:
            return data, ""
        packed = c.compress(data)
        if align(len(packed), UNIT) < align(n, UNIT):
            return packed, c.name
        return data, ""

    def batch(self, limit: int = BATCH_BYTES, journal: RefJournal | None = None) -> Batch:
        """A :class:`Batch`: many puts, one durable commit (auto-commits every ``limit``
        bytes); each commit's references are also recorded in ``journal``."""
        return Batch(self, limit, journal)

    def pending(self) -> RefJournal:
        """A journal for an operation whose references outlive one batch (see
        :mod:`~stellarium_core.nebula.pending`)."""
        return RefJournal(self.root / PENDING)

    # -- the public API ----------------------------------------------------------------

    def put(self, data: bytes | memoryview, mappable: bool = False) -> bytes:
        """Store ``data`` if new, else add a reference; +1 ref either way. Durable on
        return. ``mappable``: so that :meth:`mapping` can hand it out (see Batch.put)."""
        with self.batch() as b:
            return b.put(data, mappable)

    def put_stream(self, src: Source, chunker: Chunker,
                   mappable: bool = False) -> list[tuple[bytes, int]]:
        """Chunk and store a file or stream; [(digest, length)] once all is durable.
        ``mappable``: every chunk so that :meth:`mapping` can hand it out."""
        with self.batch() as b:
            return b.put_stream(src, chunker, mappable)

    def _entry(self, digest: bytes) -> Entry:
        index = self.index
        with index.mu:
            e = index.table.get(digest)
            if e is None:
                index.catch_up()
                e = index.table.get(digest)
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

    def missing(self, digests: Iterable[bytes]) -> list[bytes]:
        """Those of ``digests`` the store does not hold, in order: one look at the index
        for all of them (a manifest lists hundreds)."""
        index = self.index
        with index.mu:
            index.catch_up()
            return [d for d in digests if d not in index.table]

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
                with self.index.mu:
                    mm = self.packs.map(e.pack, e.offset + e.stored)
                return memoryview(mm)[e.offset:e.offset + e.stored]
            except FileNotFoundError:
                if attempt == 0:  # a gc may have moved it: re-read the index once
                    with self.index.mu:
                        self.index.catch_up()
                    e = self._entry(digest)
        raise CorruptChunkError(f"chunk {digest.hex()} is unreadable: "
                                f"{self.pack_path(e.pack)} is missing")

    def _check(self, digest: bytes, data: bytes | memoryview, e: Entry) -> None:
        if self._digest(data) != digest:
            raise CorruptChunkError(
                f"chunk {digest.hex()} is corrupt: its bytes in {self.pack_path(e.pack)} at "
                f"offset {e.offset} no longer hash to its digest")

    def decompress(self, digest: bytes, e: Entry, stored: bytes | memoryview) -> bytes:
        """A compressed chunk's bytes, with the compressor its record names.

        MissingCompressorError when none of that name is installed (the chunk is
        kept; installing the plugin makes it readable), CorruptChunkError when the
        bytes do not decompress to the recorded size.
        """
        try:
            c = self.compressors(e.codec)
        except PluginError as exc:
            raise MissingCompressorError(
                f"chunk {digest.hex()} was compressed with {e.codec!r}, which this host "
                f"cannot read: {exc}") from None
        try:
            return c.decompress(stored, e.raw)
        except ValueError as exc:
            raise CorruptChunkError(
                f"chunk {digest.hex()} is corrupt: its {e.codec} bytes in "
                f"{self.pack_path(e.pack)} at offset {e.offset} do not decompress to its "
                f"{e.raw} bytes ({exc})") from None

    def get(self, digest: bytes) -> bytes:
        """The chunk's bytes, verified unless ``verify_reads`` is off."""
        e = self._entry(digest)
        raw = self._stored_view(digest, e)
        data = self.decompress(digest, e, raw) if e.codec else bytes(raw)
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

    def mapping(self, digest: bytes) -> ChunkMapping:
        """Where a mappable chunk's bytes are in its pack, leased until released:
        the contract is in :mod:`~stellarium_core.nebula.mapping`.

        MissingChunkError if absent, NotMappableError if it was not written with
        ``mappable=True``, CorruptChunkError if its pack no longer covers it or
        (checked once per store: :mod:`~stellarium_core.nebula.verified`) its bytes do
        not hash to its digest.
        """
        index, leases = self.index, self._leases
        for _ in range(3):
            e = self._entry(digest)
            if not e.mappable:
                raise NotMappableError(f"chunk {digest.hex()} is not stored mappable (it "
                                       "was written without mappable=True); read it with get")
            try:
                fd = leases.take(e.pack, index.mu)   # waits while a gc works on the pack
            except FileNotFoundError:
                fd = -1
            ok = False
            try:
                st = os.fstat(fd) if fd >= 0 else None
                if st is not None and st.st_nlink:
                    with index.mu:
                        index.catch_up()
                        now = index.table.get(digest)
                    if now is not None and (now.pack, now.offset) == (e.pack, e.offset):
                        m = self._leased_mapping(digest, e, fd, st.st_size)
                        ok = True
                        return m
            finally:
                if fd >= 0 and not ok:
                    leases.give(e.pack, index.mu)
            with index.mu:   # a gc moved it meanwhile: look again
                index.catch_up()
        raise ChunkError(f"chunk {digest.hex()} kept moving while being mapped (gc running "
                         "in a loop?); try again")

    def mappings(self, digests: Sequence[bytes]) -> list[ChunkMapping]:
        """:meth:`mapping` of each of ``digests``, in order, with the index caught up and
        each pack leased and looked at once rather than once per chunk (a restore maps
        hundreds). The same errors; on one, nothing stays leased."""
        index, leases = self.index, self._leases
        with index.mu:
            index.catch_up()
            before = [index.table.get(d) for d in digests]
        fds: dict[int, int] = {}
        out: list[ChunkMapping] = []
        try:
            for pack in {e.pack for e in before if e is not None and e.mappable}:
                try:
                    fds[pack] = leases.take(pack, index.mu)
                except FileNotFoundError:
                    pass
            sizes = {pack: st.st_size for pack, fd in fds.items()
                     if (st := os.fstat(fd)).st_nlink}
            with index.mu:           # what a gc moved before the leases were taken
                now = [index.table.get(d) for d in digests] if index.catch_up() else before
            for d, e, n in zip(digests, before, now, strict=True):
                if e is None or not e.mappable or e.pack not in sizes or n is None \
                        or (n.pack, n.offset) != (e.pack, e.offset):
                    out.append(self.mapping(d))   # its error, or a look again
                    continue
                leases.take(e.pack, index.mu)   # held: a count, no syscall
                try:
                    out.append(self._leased_mapping(d, e, fds[e.pack], sizes[e.pack]))
                except BaseException:
                    leases.give(e.pack, index.mu)
                    raise
        except BaseException:
            for m in out:
                m.release()
            raise
        finally:
            for pack in fds:
                leases.give(pack, index.mu)
        return out

    def _leased_mapping(self, digest: bytes, e: Entry, fd: int, size: int) -> ChunkMapping:
        """The mapping of a chunk whose pack's lease the caller took for it; the pack
        (``size`` bytes) covers the chunk's pages; the first time, its bytes are right."""
        end = e.offset + align(e.raw, PAGE)
        if size < end:
            raise CorruptChunkError(f"chunk {digest.hex()} cannot be mapped: "
                                    f"{self.pack_path(e.pack)} is truncated to {size} bytes, "
                                    f"the chunk's pages end at {end}")
        key = (e.pack, e.offset, digest)
        if key not in self._verified:
            data = os.pread(fd, end - e.offset, e.offset)
            if (len(data) != end - e.offset or self._digest(memoryview(data)[:e.raw]) != digest
                    or data.count(0, e.raw) != len(data) - e.raw):
                raise CorruptChunkError(f"chunk {digest.hex()} is corrupt: its bytes in "
                                        f"{self.pack_path(e.pack)} at offset {e.offset} no "
                                        "longer hash to its digest (or its last page holds "
                                        "more)")
            self._verified.add(key)
        return ChunkMapping(digest, self.pack_path(e.pack), fd, e.offset, e.raw,
                            partial(self._leases.give, e.pack, self.index.mu))

    def _ref_deltas(self, deltas: Mapping[bytes, int]) -> None:
        """Apply reference changes in one durable append: all of them or, if any chunk
        is missing or would drop below zero, none."""
        with self.lock():
            records = []
            for digest, n in deltas.items():
                e = self.index.table.get(digest)
                if e is None:
                    raise MissingChunkError(f"chunk {digest.hex()} is not in the store")
                if n < 0 and e.refs < -n:
                    raise ChunkError(f"chunk {digest.hex()} has {e.refs} references; "
                                     f"cannot release {-n}")
                records.append(log_record(REF, digest, delta=n))
            if not records:
                return
            try:
                self.index.append(records)
            except OSError as exc:
                raise ChunkError(f"updating references in {self.root} failed: "
                                 f"{exc.strerror}") from None

    @staticmethod
    def _counts(counts: Mapping[bytes, int], what: str) -> dict[bytes, int]:
        bad = [n for n in counts.values() if n < 0]
        if bad:
            raise UsageError(f"{what} count must not be negative, got {bad[0]}")
        return {d: n for d, n in counts.items() if n}

    def release_at_most(self, counts: Mapping[bytes, int]) -> None:
        """Drop up to ``counts[d]`` references from each chunk, never below zero, in
        one durable append: for undoing what an operation took (chunks at 0 wait for gc)."""
        with self.lock():
            records = []
            for d, n in counts.items():
                e = self.index.table.get(d)
                if e is not None and e.refs:
                    records.append(log_record(REF, d, delta=-min(n, e.refs)))
            try:
                self.index.append(records)
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
        with self.index.mu:
            self.index.catch_up()
            return len(self.index.table)

    def digests(self) -> list[bytes]:
        with self.index.mu:
            self.index.catch_up()
            return [d for d, _ in self.index.table.items()]

    def items(self) -> list[tuple[bytes, Entry]]:
        with self.index.mu:
            self.index.catch_up()
            return list(self.index.table.items())

    def stats(self) -> dict[str, Any]:
        """Logical, unique and stored bytes, chunk count, dedup ratio, compression savings,
        chunks per compressor ("none" for raw), mappable chunks."""
        logical = unique = stored = compressed = mappable = 0
        count = 0
        by_codec: dict[str, int] = {}
        for _, e in self.items():
            count += 1
            logical += e.raw * e.refs
            unique += e.raw
            stored += e.stored
            compressed += e.compressed
            mappable += e.mappable
            by_codec[e.codec or NONE] = by_codec.get(e.codec or NONE, 0) + 1
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
            "mappable_chunks": mappable,
            "compression_saved_bytes": unique - stored,
            "chunks_by_compressor": dict(sorted(by_codec.items())),
            "index_memory_bytes": self.index.table.nbytes(),
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
        with self.index.mu:
            self.packs.close()
            self.index.close()
            if self._users_fd >= 0:
                os.close(self._users_fd)
                self._users_fd = -1

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
