"""Bad input to the chunk store: corrupt packs, a damaged index, a lost pack, a full disk."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import (
    ChunkError,
    ChunkStore,
    CorruptChunkError,
    MissingChunkError,
    pending,
)
from stellarium_core.nebula.format import LOG_HEADER, LOG_SIZE
from stellarium_core.nebula.ingest import ingest
from tests.helpers import tmpfs

HASHER = Blake3Hasher({})


class Fixed:
    name, max_size, params = "fixed-test", 16384, {}

    def cut(self, data: memoryview):
        for start in range(0, len(data), self.max_size):
            yield min(self.max_size, len(data) - start)


def _blobs(n: int, seed: int = 0) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(5000 + i) for i in range(n)]


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_pack_bytes(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    text = b"compressible text " * 2000
    with ChunkStore.open(root, HASHER, create=True) as s:
        ds = [s.put(b) for b in _blobs(3)]
        dz = s.put(text)
        bad, badz = s.entry(ds[1]), s.entry(dz)
    assert badz.compressed
    _flip(root / "packs" / "pack-000001.dat", bad.offset + 77)
    _flip(root / "packs" / "pack-000001.dat", badz.offset + 5)
    with ChunkStore.open(root, HASHER) as s:
        rep = s.fsck()
        errs = {p.chunk: p for p in rep.errors}
        assert set(errs) == {ds[1].hex(), dz.hex()}
        assert errs[ds[1].hex()].file == "packs/pack-000001.dat"
        assert errs[ds[1].hex()].offset == bad.offset
        assert "corrupt" in errs[ds[1].hex()].what
        with pytest.raises(CorruptChunkError, match=ds[1].hex()):
            s.get(ds[1])
        with pytest.raises(CorruptChunkError, match=dz.hex()):
            s.get(dz)
        with pytest.raises(CorruptChunkError):
            s.view(ds[1])
        assert s.get(ds[0]) == _blobs(3)[0] and s.get(ds[2]) == _blobs(3)[2]


def test_truncated_and_damaged_index(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    blobs = _blobs(6)
    with ChunkStore.open(root, HASHER, create=True) as s:
        ds = [s.put(b) for b in blobs]          # one index record per put
    log = root / "index.log"
    size = log.stat().st_size
    assert size == LOG_HEADER.size + 6 * LOG_SIZE
    os.truncate(log, size - LOG_SIZE - 20)     # lose record 5 whole and most of record 4
    _flip(log, LOG_HEADER.size + 1 * LOG_SIZE + 40)  # and damage record 1
    with ChunkStore.open(root, HASHER) as s:
        for i in (0, 2, 3):
            assert s.get(ds[i]) == blobs[i]
        for i in (1, 4, 5):
            with pytest.raises(MissingChunkError, match=ds[i].hex()):
                s.get(ds[i])
        rep = s.fsck()
        assert [p.offset for p in rep.errors] == [LOG_HEADER.size + LOG_SIZE]
        assert "checksum" in rep.errors[0].what and rep.errors[0].file == "index.log"
        torn = [p for p in rep.problems if "torn" in p.what]
        assert torn and torn[0].offset == LOG_HEADER.size + 4 * LOG_SIZE
        lost = {p.chunk for p in rep.problems if "unindexed chunk" in p.what}
        assert lost == {ds[i].hex() for i in (1, 4, 5)}
        fixed = s.fsck(repair=True)
        assert fixed.repaired == 3
        assert [s.get(d) for d in ds] == blobs
    with ChunkStore.open(root, HASHER) as s:
        assert [s.get(d) for d in ds] == blobs


def test_missing_and_truncated_pack_files(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    blobs = _blobs(12)
    with ChunkStore.open(root, HASHER, create=True, pack_max=20000) as s:
        ds = [s.put(b) for b in blobs]
        where = {d: s.entry(d).pack for d in ds}
    assert len(set(where.values())) >= 3
    (root / "packs" / "pack-000002.dat").unlink()
    gone = {d for d, p in where.items() if p == 2}
    pack3 = root / "packs" / "pack-000003.dat"
    cut = max((d for d in ds if where[d] == 3), key=lambda d: ds.index(d))  # its last chunk
    os.truncate(pack3, pack3.stat().st_size - 4000)   # past the padding, into the chunk
    with ChunkStore.open(root, HASHER) as s:
        rep = s.fsck()
        assert {p.chunk for p in rep.errors} == {d.hex() for d in gone} | {cut.hex()}
        assert all("pack-000002.dat is missing" in p.what for p in rep.errors
                   if p.chunk != cut.hex())
        assert [p.what for p in rep.errors if p.chunk == cut.hex()][0].startswith(
            "pack is truncated")
        with pytest.raises(CorruptChunkError, match="pack-000003.dat is truncated"):
            s.get(cut)
        for d, b in zip(ds, blobs, strict=True):
            if d in gone:
                with pytest.raises(CorruptChunkError, match="pack-000002.dat is missing"):
                    s.get(d)
            elif d != cut:
                assert s.get(d) == b


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 1 MiB tmpfs, so the disk really fills up."""
    with tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_disk_full_fails_cleanly(tiny_fs: Path, tmp_path: Path) -> None:
    root = tiny_fs / "nebula"
    rnd = random.Random(9)
    kept: dict[bytes, bytes] = {}
    with ChunkStore.open(root, HASHER, create=True) as s:
        with pytest.raises(ChunkError, match="No space left on device.*nothing was added"):
            for _ in range(1000):
                blob = rnd.randbytes(30000)
                kept[s.put(blob)] = blob
        assert 10 < len(kept) < 1000
        sizes = {p.name: p.stat().st_size for p in (root / "packs").iterdir()}
        log_size = (root / "index.log").stat().st_size
        # an ingest that cannot fit fails the same way and leaves no references behind
        tree = tmp_path / "tree"
        tree.mkdir()
        for i in range(8):
            (tree / f"f{i}").write_bytes(rnd.randbytes(100_000))
        refs_before = {d: s.refs(d) for d in kept}
        with pytest.raises(ChunkError, match="No space left on device"):
            ingest(s, tree, Fixed())
        assert {d: s.refs(d) for d in kept} == refs_before
    assert (root / "index.log").stat().st_size == log_size
    assert {p.name: p.stat().st_size for p in (root / "packs").iterdir()} == sizes
    with ChunkStore.open(root, HASHER) as s:
        rep = s.fsck()
        assert rep.ok and not [p for p in rep.problems if p.severity != "note"]
        assert len(s) == len(kept)
        assert all(s.get(d) == b for d, b in kept.items())


def test_damaged_index_snapshot(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    blobs = _blobs(5)
    with ChunkStore.open(root, HASHER, create=True) as s:
        ds = [s.put(b) for b in blobs]
        with s.lock():
            s.compact_index()
        later = s.put(b"written after the snapshot")
    _flip(root / "index.snap", 200)                   # inside the first record block
    with ChunkStore.open(root, HASHER) as s:
        assert s.get(later) == b"written after the snapshot"
        with pytest.raises(MissingChunkError):
            s.get(ds[0])
        rep = s.fsck()
        assert [p.file for p in rep.errors] == ["index.snap"]
        assert "fail their checksum" in rep.errors[0].what
        lost = {p.chunk for p in rep.problems if "unindexed chunk" in p.what}
        assert lost == {d.hex() for d in ds}
        assert s.fsck(repair=True).repaired == 5
        assert [s.get(d) for d in ds] == blobs


def test_damaged_snapshot_header_still_opens(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    blobs = _blobs(3)
    with ChunkStore.open(root, HASHER, create=True) as s:
        ds = [s.put(b) for b in blobs]
        with s.lock():
            s.compact_index()
    _flip(root / "index.snap", 3)                     # the magic
    with ChunkStore.open(root, HASHER) as s:
        rep = s.fsck()
        assert any(p.file == "index.snap" and "header is damaged" in p.what
                   for p in rep.errors)
        assert s.fsck(repair=True).repaired == 3
        assert [s.get(d) for d in ds] == blobs
    with ChunkStore.open(root, HASHER) as s:
        assert s.fsck().ok and [s.get(d) for d in ds] == blobs


def test_reference_journals_read_back_stop_at_a_torn_record_and_still_read_json(
        tmp_path: Path) -> None:
    """A journal's records sum up; reading stops at the first torn or damaged one
    (never releases what a record that did not become durable lists); the JSON
    lines of older journals still read; a file of garbage is a ValueError."""
    a, b = HASHER.digest(b"a"), HASHER.digest(b"b")
    first, second = pending.encode({a: 2, b: 1}), pending.encode({a: 1})
    path = tmp_path / "j.refs"
    path.write_bytes(first + second)
    assert pending.read_counts(path) == {a: 3, b: 1}
    for cut in range(1, len(second)):
        path.write_bytes(first + second[:cut])
        assert pending.read_counts(path) == {a: 2, b: 1}
    damaged = bytearray(second)
    damaged[10] ^= 1
    path.write_bytes(first + bytes(damaged) + first)
    assert pending.read_counts(path) == {a: 2, b: 1}
    path.write_bytes(b'{"%s":2}\n{"%s":1}\n{"%s":' % (a.hex().encode(), b.hex().encode(),
                                                        a.hex().encode()))
    assert pending.read_counts(path) == {a: 2, b: 1}
    for junk in (b"\0" * 100, first[:-1], b"{not json"):
        path.write_bytes(junk)
        with pytest.raises(ValueError, match="no readable reference"):
            pending.read_counts(path)
    path.write_bytes(b"")
    assert pending.read_counts(path) == {}
