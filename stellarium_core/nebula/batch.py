"""Batches: many chunks hashed and queued, then made durable together.

A commit is the store's write protocol: under the store lock, swap chunks that
another process stored (or a gc dropped) meanwhile between "new" and
"reference", append the new ones to packs and fsync, then append their index
records and fsync. A crash in between leaves unindexed pack bytes, which ``fsck``
reports as harmless leftovers and ``gc`` reclaims.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from stellarium_core.nebula.chunking import Source, chunks, min_chunk
from stellarium_core.nebula.cosmic import pack_files
from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.format import PUT, REF, log_record
from stellarium_core.nebula.pending import RefJournal
from stellarium_core.nebula.table import MAPPABLE, MAX_LEN
from stellarium_core.nebula.workers import Item, Pack, cores, cut

if TYPE_CHECKING:
    from stellarium_core.hookspecs import Chunker
    from stellarium_core.nebula.store import ChunkStore

BATCH_BYTES = 64 << 20
PARALLEL_BYTES = 8 << 20


class _Pending:
    """A chunk hashed but not yet durable: its bytes and the references to add.

    ``codec`` (the compressor's name, "" for raw) is None for a chunk the store
    already had (a dedup hit): then ``data`` is its raw bytes, or None and ``src``
    says where in a file they are. They are needed only if a concurrent gc drops
    that chunk before our commit, so it can be written after all.
    """

    __slots__ = ("data", "raw", "codec", "refs", "src", "flags")

    def __init__(self, data: bytes | memoryview | None, raw: int, codec: str | None,
                 src: tuple[Item, int] | None = None, flags: int = 0) -> None:
        self.data, self.raw, self.codec, self.refs, self.src = data, raw, codec, 1, src
        self.flags = flags   # MAPPABLE when some put asked for it


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

    def put(self, data: bytes | memoryview, mappable: bool = False) -> bytes:
        """Hash ``data`` and queue it (or a reference to it); returns its digest.

        ``mappable`` stores it so that it can be mmapped from its pack (see
        :meth:`ChunkStore.mapping`): raw, page-aligned. A chunk the store has in
        another form gets a mappable copy, which the index then points to.
        """
        s = self._store
        n = len(data)
        if n > MAX_LEN:
            raise ChunkError(f"chunk of {n} bytes is larger than the store's limit {MAX_LEN}")
        digest = s.hasher.digest(data)
        flags = MAPPABLE if mappable else 0
        p = self._new.get(digest) or self._refs.get(digest)
        if p is not None:
            p.refs += 1
            if flags and not p.flags:   # keep its raw bytes: the commit may need them
                p.data, p.flags = data, flags
                if p.codec is not None:
                    p.codec = ""
            return digest
        if s.indexed(digest, mappable):
            self._refs[digest] = _Pending(data, n, None, flags=flags)
        else:
            stored, codec = (data, "") if mappable else s.compress(data)
            self._new[digest] = _Pending(stored, n, codec, flags=flags)
        self._bytes += n
        if self._bytes >= self._limit:
            self.commit()
        return digest

    def _floor_of(self, chunker: Chunker) -> int:
        if chunker is not self._chunker:
            self._chunker, self._floor = chunker, min_chunk(chunker)
        return self._floor

    def put_stream(self, src: Source, chunker: Chunker,
                   mappable: bool = False) -> list[tuple[bytes, int]]:
        """Chunk a file (path) or binary file object and queue every chunk (each
        mappable, if asked: see :meth:`put`)."""
        return [(self.put(c, mappable), len(c))
                for c in chunks(src, chunker, self._floor_of(chunker))]

    def put_pack(self, files: Pack) -> tuple[bytes, int]:
        """Queue one Cosmic Pack of small files (path, size as listed): (digest, length)."""
        pack = pack_files(files, self._store.hasher)
        return self.put(pack), len(pack)

    def put_files(self, files: Iterable[tuple[Item, int]], chunker: Chunker,
                  workers: int | None = None) -> Iterator[list[tuple[bytes, int]]]:
        """Store many files using every core; yields each file's [(digest, length)]
        in the order given. ``files`` are (path, size as listed), or (pack, total
        size) for small files that go into one Cosmic Pack (see :meth:`put_pack`).

        Worker processes read, cut, hash and compress files ahead of the caller
        (see :mod:`~stellarium_core.nebula.workers`); this thread decides what is
        new, queues in order and commits, so what becomes durable, and when, is
        as with :meth:`put_stream` file after file. ``workers`` defaults to the
        cores this process may use; for fewer than ``PARALLEL_BYTES`` in all (a
        fork would cost more), files are stored in this thread alone.
        """
        floor = self._floor_of(chunker)
        files = list(files)
        if sum(n for _, n in files) < PARALLEL_BYTES:
            for src, _ in files:
                yield [self.put_pack(src)] if isinstance(src, tuple) else \
                    self.put_stream(src, chunker)
            return
        s = self._store
        for path, parts in cut(s.hasher, files, chunker, floor, workers or cores(),
                               s.index.table.__contains__, s.compress):
            if parts is None:
                assert isinstance(path, str)
                yield self.put_stream(path, chunker)
                continue
            fresh: dict[bytes, list[int]] = {}   # digest -> [length, offset, uses]
            offset = 0
            for digest, n, stored, codec in parts:
                p = self._new.get(digest) or self._refs.get(digest)
                if p is not None:
                    p.refs += 1
                elif digest in fresh:
                    fresh[digest][2] += 1
                elif s.indexed(digest):
                    self._refs[digest] = _Pending(None, n, None, (path, offset))
                    self._bytes += n
                elif stored is not None:
                    self._new[digest] = _Pending(stored, n, codec)
                    self._bytes += n
                else:   # the worker took it for stored; it is not (gc, another worker)
                    fresh[digest] = [n, offset, 1]
                offset += n
            if fresh:
                for digest, data, codec in _fresh(s, path, fresh):
                    n, _, uses = fresh[digest]
                    p = self._new[digest] = _Pending(data, n, codec)
                    p.refs = uses
                    self._bytes += n
            if self._bytes >= self._limit:
                self.commit()
            yield [(d, n) for d, n, _, _ in parts]

    def commit(self) -> None:
        """Make everything queued durable; afterwards the batch is empty and reusable."""
        new, refs = self._new, self._refs
        self._new, self._refs, self._bytes = {}, {}, 0
        if new or refs:
            _commit(self._store, new, refs)
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
                self._store.release_at_most(durable)
            except ChunkError:
                pass

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _raw_bytes(s: ChunkStore, digest: bytes, p: _Pending) -> bytes | memoryview:
    """A dedup hit's bytes, read again from its file if only its place was kept."""
    if p.data is not None:
        return p.data
    assert p.src is not None
    src, offset = p.src
    if isinstance(src, tuple):
        return _repack(s, src, digest)
    with open(src, "rb") as fh:
        return _reread(s, fh.fileno(), src, offset, p.raw, digest)


def _repack(s: ChunkStore, files: Pack, digest: bytes) -> bytes:
    """A Cosmic Pack of small files built again, which must still hash to ``digest``."""
    data = pack_files(files, s.hasher)
    if s.hasher.digest(data) != digest:
        raise ChunkError(f"{files[0][0]} or a small file after it changed while it was "
                         "being stored")
    return data


def _reread(s: ChunkStore, fd: int, path: str, offset: int, n: int, digest: bytes) -> bytes:
    """``n`` bytes at ``offset`` of a file, which must still hash to ``digest``."""
    try:
        data = os.pread(fd, n, offset)
    except OSError as exc:
        raise ChunkError(f"cannot read {path} again: {exc.strerror}") from None
    if s.hasher.digest(data) != digest:
        raise ChunkError(f"{path} changed while it was being stored")
    return data


def _fresh(s: ChunkStore, path: Item, fresh: dict[bytes, list[int]]
           ) -> Iterator[tuple[bytes, bytes | memoryview, str]]:
    """New chunks of one file or pack ({digest: [length, offset, uses]}) that a
    worker took for stored and sent no bytes of: read again, checked against their
    digest, compressed."""
    if isinstance(path, tuple):
        for digest in fresh:
            yield (digest, *s.compress(_repack(s, path, digest)))
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ChunkError(f"cannot read {path} again: {exc.strerror}") from None
    try:
        for digest, (n, offset, _) in fresh.items():
            yield (digest, *s.compress(_reread(s, fd, path, offset, n, digest)))
    finally:
        os.close(fd)


def _commit(s: ChunkStore, new: dict[bytes, _Pending], refs: dict[bytes, _Pending]) -> None:
    """Store ``new`` chunks and add ``refs``, durably (see the module docstring)."""
    index, packs = s.index, s.packs
    with index.locked():
        # Another process may have stored some of our new chunks meanwhile, and a
        # gc may have dropped chunks we meant to reference: swap them over.
        table = index.table

        def have(d: bytes, p: _Pending) -> bool:   # in the form it was asked for
            e = table.get(d)
            return e is not None and (e.mappable or not p.flags & MAPPABLE)

        for d in [d for d, p in new.items() if have(d, p)]:
            refs[d] = new.pop(d)
        for d in [d for d, p in refs.items() if not have(d, p)]:
            p = new[d] = refs.pop(d)
            if p.codec is None:
                raw = _raw_bytes(s, d, p)
                p.data, p.codec = (raw, "") if p.flags & MAPPABLE else s.compress(raw)
        try:
            for p in new.values():
                table.slot(p.codec or "")  # before anything is written: at most 7 codecs
        except ValueError as exc:
            raise ChunkError(f"cannot write to the chunk store {s.root}: {exc}") from None
        try:
            items = [(d, p.data, p.raw, p.flags, p.codec or "") for d, p in new.items()]
            places, undo = packs.write(items) if items else ([], [])
            placed = [(d, pack, off, len(data), raw, new[d].refs, flags, codec)
                      for (d, data, raw, flags, codec), (pack, off)
                      in zip(items, places, strict=True)]
            records = [log_record(PUT, *rec) for rec in placed]
            records += [log_record(REF, d, delta=p.refs) for d, p in refs.items()]

            def apply() -> None:
                table = index.table
                for d, pack, off, stored, raw, n, flags, codec in placed:
                    table.upsert(d, pack, off, stored, raw, n, flags | table.slot(codec))
                for d, p in refs.items():
                    table.add_refs(d, p.refs)

            try:
                index.append(records, apply)
            except OSError:
                packs.cut_back(undo)
                raise
        except OSError as exc:
            raise ChunkError(f"write to the chunk store {s.root} failed: "
                             f"{exc.strerror or exc}; nothing was added") from None
        if s.log_outgrown():
            try:
                index.compact()
            except OSError:  # the log stays valid; compaction is retried next commit
                pass
    if s.on_stored is not None:
        for d, p in new.items():
            s.on_stored(d, p.raw, True)
        for d, p in refs.items():
            s.on_stored(d, p.raw, False)
