"""NEBULA chunk store: insert-or-reference, reads, refs, gc, stats, persistence."""

from __future__ import annotations

import io
import mmap
import os
import random
from pathlib import Path

import pytest

from stellarium_core.errors import UsageError
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkError, ChunkStore, CorruptChunkError, MissingChunkError
from stellarium_core.nebula.table import UNIT, ChunkTable

HASHER = Blake3Hasher({})


class Fixed:
    """A tiny fixed-size chunker, so these tests do not depend on a plugin."""

    name = "fixed-test"

    def __init__(self, size: int) -> None:
        self.max_size = size

    params: dict = {}

    def cut(self, data: memoryview):
        for start in range(0, len(data), self.max_size):
            yield min(self.max_size, len(data) - start)


@pytest.fixture
def store(tmp_path: Path):
    with ChunkStore.open(tmp_path / "nebula", HASHER, create=True) as s:
        yield s


def test_put_dedups_and_counts_refs(store: ChunkStore) -> None:
    d1 = store.put(b"alpha" * 1000)
    d2 = store.put(memoryview(b"alpha" * 1000))
    assert d1 == d2 == HASHER.digest(b"alpha" * 1000)
    assert store.refs(d1) == 2 and len(store) == 1
    assert store.get(d1) == b"alpha" * 1000 and store.size(d1) == 5000
    e = store.entry(d1)
    assert e.offset % UNIT == 0
    assert len(store.pack_numbers()) == 1


def test_compression_only_when_it_saves_space(store: ChunkStore) -> None:
    rnd = random.Random(1).randbytes(64 * 1024)
    text = b"the same words again " * 4000
    dr, dt = store.put(rnd), store.put(text)
    assert not store.entry(dr).compressed and store.entry(dr).stored == len(rnd)
    assert store.entry(dt).compressed and store.entry(dt).stored < len(text) // 4
    assert store.get(dt) == text and bytes(store.view(dt)) == text
    st = store.stats()
    assert st["compressed_chunks"] == 1
    assert st["compression_saved_bytes"] == len(text) - store.entry(dt).stored


def test_view_is_zero_copy_over_the_pack(store: ChunkStore) -> None:
    data = random.Random(2).randbytes(20000)
    d = store.put(data)
    v = store.view(d)
    assert isinstance(v.obj, mmap.mmap) and v == data


def test_put_stream_path_and_fileobj_agree(store: ChunkStore, tmp_path: Path) -> None:
    data = random.Random(3).randbytes(300_000) * 2  # second half dedups against the first
    p = tmp_path / "in.bin"
    p.write_bytes(data)
    a = store.put_stream(p, Fixed(50_000))
    b = store.put_stream(io.BytesIO(data), Fixed(50_000))
    assert a == b and sum(n for _, n in a) == len(data)
    assert b"".join(store.get(d) for d, _ in a) == data
    assert len(store) == 6
    assert store.stats()["dedup_ratio"] == pytest.approx(4.0)
    assert store.put_stream(io.BytesIO(b""), Fixed(10)) == []


def test_reopen_keeps_everything(tmp_path: Path) -> None:
    blobs = [os.urandom(n) for n in (1, 4000, 5000, 70000)]
    with ChunkStore.open(tmp_path / "n", HASHER, create=True) as s:
        ds = [s.put(b) for b in blobs]
        s.ref(ds[0], 3)
    with ChunkStore.open(tmp_path / "n", HASHER) as s:
        assert [s.get(d) for d in ds] == blobs
        assert s.refs(ds[0]) == 4


def test_missing_and_bad_arguments(store: ChunkStore, tmp_path: Path) -> None:
    with pytest.raises(MissingChunkError, match="not in the store"):
        store.get(b"\0" * 32)
    assert not store.contains(b"\0" * 32)
    d = store.put(b"x")
    with pytest.raises(ChunkError, match="cannot release 2"):
        store.release(d, 2)
    with pytest.raises(ChunkError, match="no chunk store"):
        ChunkStore.open(tmp_path / "absent", HASHER)


def test_missing_names_the_absent_digests_in_order_as_other_writers_left_them(
        store: ChunkStore, tmp_path: Path) -> None:
    a = store.put(b"alpha")
    absent = [HASHER.digest(b"x"), HASHER.digest(b"y")]
    assert store.missing([absent[1], a, absent[0]]) == [absent[1], absent[0]]
    with ChunkStore.open(tmp_path / "nebula", HASHER) as other:   # another process's view
        assert other.missing(iter([a, *absent])) == absent
        store.put(b"y")
        store.release(a)
        assert other.missing([a, *absent]) == [absent[0]]     # unreferenced, not gone
        store.gc()
        assert other.missing([a, *absent]) == [a, absent[0]]
    assert store.missing([]) == []


def test_ref_many_and_release_many_are_one_append_all_or_nothing(store: ChunkStore) -> None:
    a, b = store.put(b"alpha"), store.put(b"beta")
    log = store.log_path.stat().st_size
    store.ref_many({a: 2, b: 1})
    record = (store.log_path.stat().st_size - log) // 2  # two REF records, appended at once
    assert store.refs(a) == 3 and store.refs(b) == 2
    missing = HASHER.digest(b"never stored")
    with pytest.raises(MissingChunkError):
        store.ref_many({a: 1, missing: 1})
    with pytest.raises(ChunkError, match="cannot release 5"):
        store.release_many({a: 1, b: 5})
    assert store.refs(a) == 3 and store.refs(b) == 2  # nothing applied by either
    store.release_many({a: 2, b: 0})
    assert store.refs(a) == 1 and store.refs(b) == 2
    assert store.log_path.stat().st_size - log == 3 * record  # failures appended nothing
    with pytest.raises(UsageError, match="must not be negative"):
        store.ref_many({a: -1})


def test_release_gc_reclaims_and_compacts(store: ChunkStore) -> None:
    keep = [store.put(os.urandom(30000)) for _ in range(3)]
    drop = [store.put(os.urandom(30000)) for _ in range(12)]
    before = store.stats()["pack_bytes"]
    for d in drop:
        store.release(d)
    assert any("12 chunks have no references" in p.what for p in store.fsck().problems)
    out = store.gc()
    assert out["chunks_removed"] == 12 and out["chunks_moved"] == 3
    assert out["packs_removed"] == 1
    assert not any(store.contains(d) for d in drop)
    assert all(len(store.get(d)) == 30000 for d in keep)
    assert store.stats()["pack_bytes"] < before // 3
    assert store.fsck().ok
    # the compacted index replays to the same state
    with ChunkStore.open(store.root, HASHER) as again:
        assert sorted(again.digests()) == sorted(keep)


def test_corrupt_read_fails_unless_verification_off(tmp_path: Path) -> None:
    with ChunkStore.open(tmp_path / "n", HASHER, create=True) as s:
        d = s.put(os.urandom(10000))
        e = s.entry(d)
    path = tmp_path / "n" / "packs" / "pack-000001.dat"
    with open(path, "r+b") as fh:
        fh.seek(e.offset + 100)
        fh.write(b"\xff\x00\xff")
    with ChunkStore.open(tmp_path / "n", HASHER) as s:
        with pytest.raises(CorruptChunkError, match=f"{d.hex()} is corrupt"):
            s.get(d)
    with ChunkStore.open(tmp_path / "n", HASHER, verify_reads=False) as s:
        assert len(s.get(d)) == 10000


def test_table_stays_compact() -> None:
    t = ChunkTable()
    rnd = random.Random(4)
    keys = [rnd.randbytes(32) for _ in range(50_000)]
    for i, k in enumerate(keys):
        t.upsert(k, 1, i * UNIT, 100, 200, 1, 0)
    assert t.get(keys[12345]).offset == 12345 * UNIT
    t.add_refs(keys[7], 5)
    t.delete(keys[8])
    assert t.get(keys[7]).refs == 6 and t.get(keys[8]) is None and len(t) == 49_999
    t.compact()
    assert len(t) == 49_999 and t.get(keys[9]).raw == 200
    assert t.nbytes() / len(t) < 64


def test_fileobj_windows_cut_like_the_whole_file(store: ChunkStore, tmp_path: Path) -> None:
    """Files and streams read in windows must give FastCDC's cuts over the whole bytes."""
    from stellarium_core.plugins import Registry

    chunker = Registry().create("chunker", "fastcdc", {})
    data = random.Random(5).randbytes(72 << 20)   # over 64 MiB: the path is read in windows
    p = tmp_path / "big.bin"
    p.write_bytes(data)
    whole = [len(c) for c in _cut_all(chunker, data)]
    from_path = store.put_stream(p, chunker)
    from_stream = store.put_stream(io.BytesIO(data), chunker)
    assert [n for _, n in from_path] == whole
    assert from_stream == from_path


def _cut_all(chunker, data: bytes):
    mv, pos = memoryview(data), 0
    for n in chunker.cut(mv):
        yield mv[pos:pos + n]
        pos += n


def test_host_store_broadcasts_chunk_stored(tmp_path: Path) -> None:
    from stellarium_core import config as config_mod
    from stellarium_core.hookspecs import hookimpl
    from stellarium_core.host import Host, init_store

    seen: list[tuple[bytes, int, bool]] = []

    class Listener:
        @hookimpl
        def stellarium_chunk_stored(self, digest: bytes, size: int, new: bool) -> None:
            seen.append((digest, size, new))

    cfg_path = tmp_path / "host.toml"
    cfg_path.write_text('[store]\npath = "store"\n')
    host = Host(config_mod.load(cfg_path))
    init_store(host)
    host.registry.pm.register(Listener())
    d = host.store.put(b"announce me")
    host.store.put(b"announce me")
    assert seen == [(d, 11, True), (d, 11, False)]
    assert host.store.root == tmp_path / "store" / "nebula"


def test_reference_to_a_chunk_gc_dropped_meanwhile_writes_it_again(store: ChunkStore) -> None:
    blob = os.urandom(9000)
    d = store.put(blob)
    store.release(d)
    with store.batch() as b:
        assert b.put(blob) == d          # a dedup hit on a chunk with 0 references...
        assert store.gc()["chunks_removed"] == 1   # ...that gc drops before the commit
        assert not store.contains(d)
    assert store.get(d) == blob and store.refs(d) == 1
    assert store.fsck().ok


def test_index_snapshot_and_interrupted_compaction(tmp_path: Path) -> None:
    root = tmp_path / "n"
    blobs = [os.urandom(3000 + i) for i in range(40)]
    with ChunkStore.open(root, HASHER, create=True) as s:
        s.compact_log_bytes = 1000       # compaction after a few commits
        ds = [s.put(b) for b in blobs]
        s.ref(ds[0], 2)
        assert (root / "index.snap").exists()
        assert (root / "index.log").stat().st_size < 1000 + 2 * 56
    with ChunkStore.open(root, HASHER) as s:
        assert [s.get(d) for d in ds] == blobs and s.refs(ds[0]) == 3
        # A compaction that stops between its two renames leaves an older log behind.
        old_log = (root / "index.log").read_bytes()
        s.ref(ds[1])
        with s.lock():
            s.compact_index()
    (root / "index.log").write_bytes(old_log)   # as if the second rename never happened
    with ChunkStore.open(root, HASHER) as s:
        assert s.refs(ds[1]) == 2 and s.refs(ds[0]) == 3   # nothing applied twice
        assert any("compaction was interrupted" in p.what for p in s.fsck().problems)
        s.ref(ds[2])                       # the next write replaces the stale log
    with ChunkStore.open(root, HASHER) as s:
        assert s.refs(ds[2]) == 2 and s.refs(ds[1]) == 2
        assert s.fsck().ok
