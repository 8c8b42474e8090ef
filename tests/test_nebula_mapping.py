"""Mappable chunks: stored so they can be mmapped straight from their pack, handed out
as (file, offset, length) under a lease that gc respects, verified once per process,
kept mappable by gc and fsck, and never a SIGBUS when a pack is truncated."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import (
    ChunkStore,
    CorruptChunkError,
    MissingChunkError,
    NotMappableError,
)
from stellarium_core.nebula.format import parse_record
from stellarium_core.nebula.table import PAGE

HASHER = Blake3Hasher({})
TEXT = b"compressible text, the same words again and again. " * 400


class Fixed:
    """A fixed grid, as block volumes and DAX bases use."""

    name, params = "fixed-test", {}

    def __init__(self, size: int) -> None:
        self.max_size = size

    def cut(self, data: memoryview):
        for start in range(0, len(data), self.max_size):
            yield min(self.max_size, len(data) - start)


def _pages_after(store: ChunkStore, d: bytes) -> bytes:
    e = store.entry(d)
    data = store.pack_path(e.pack).read_bytes()
    return data[e.offset + e.raw:e.offset + -(-e.raw // PAGE) * PAGE]


def test_mappable_chunks_are_raw_page_aligned_and_alone_in_their_pages(store) -> None:
    sizes = [1, 100, PAGE - 1, PAGE, PAGE + 1, 10_000, 65_536]
    rnd = random.Random(1)
    with store.batch() as b:
        packed = b.put(TEXT)
        blobs = {b.put(blob, mappable=True): blob
                 for blob in [(TEXT * 4)[:n] for n in sizes] + [rnd.randbytes(30_000)]}
        b.put(TEXT[::-1])   # packed chunks before and after them
    assert store.entry(packed).compressed and not store.entry(packed).mappable
    for d, blob in blobs.items():
        e = store.entry(d)
        assert e.mappable and not e.compressed and e.stored == e.raw == len(blob)
        assert e.offset % PAGE == 0
        assert _pages_after(store, d) == bytes(-len(blob) % PAGE)   # no record, only zeros
        with store.mapping(d) as m:
            assert (m.path, m.offset, m.length) == (store.pack_path(e.pack), e.offset, len(blob))
            mm = m.map()
            assert mm[:] == blob + bytes(m.size - len(blob)) and m.size % PAGE == 0
            cow = m.map(private=True)
            cow[0:1] = b"!"                       # a private copy: the pack is untouched
            assert store.get(d) == blob and mm[:1] == blob[:1]
            mm.close()
            cow.close()
        assert store.get(d) == blob and bytes(store.view(d)) == blob
    assert store.fsck().ok


def test_a_fixed_grid_stream_is_mappable_chunk_by_chunk(store, tmp_path: Path) -> None:
    volume = random.Random(2).randbytes(1 << 20) + TEXT
    src = tmp_path / "volume.img"
    src.write_bytes(volume)
    parts = store.put_stream(src, Fixed(64 * 1024), mappable=True)
    pos = 0
    for d, n in parts:
        with store.mapping(d) as m:
            mm = m.map()
            assert mm[:n] == volume[pos:pos + n]
            mm.close()
        pos += n
    assert pos == len(volume)


def test_a_packed_chunk_asked_for_mappable_gets_a_mappable_copy(store) -> None:
    d = store.put(TEXT)
    assert store.entry(d).compressed
    with pytest.raises(NotMappableError, match="not stored mappable"):
        store.mapping(d)
    assert store.put(TEXT, mappable=True) == d
    e = store.entry(d)
    assert e.mappable and e.refs == 2 and e.offset % PAGE == 0
    assert store.put(TEXT) == d and store.entry(d).mappable   # stays mappable
    with store.batch() as b:     # in one batch: the mappable wish wins
        d2 = b.put(TEXT[:5000])
        b.put(TEXT[:5000], mappable=True)
    assert store.entry(d2).mappable and store.refs(d2) == 2
    assert store.get(d) == TEXT and store.fsck().ok


def test_a_chunk_is_verified_the_first_time_the_store_maps_it(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = random.Random(3).randbytes(9000)
    with ChunkStore.open(root, HASHER, create=True) as s:
        d = s.put(data, mappable=True)
        e = s.entry(d)
    pack = root / "packs" / "pack-000001.dat"

    def flip(at: int) -> None:
        raw = bytearray(pack.read_bytes())
        raw[at] ^= 1
        pack.write_bytes(raw)

    flip(e.offset + 10)
    with ChunkStore.open(root, HASHER) as s:
        with pytest.raises(CorruptChunkError, match="no longer hash to its digest"):
            s.mapping(d)
    flip(e.offset + 10)
    with ChunkStore.open(root, HASHER) as s:
        s.mapping(d).release()                     # checked now
        flip(e.offset + 10)                        # damaged after the check:
        s.mapping(d).release()                     # trusted in this process
    flip(e.offset + 10)
    flip(e.offset + e.raw + 5)                     # garbage after it in its last page
    with ChunkStore.open(root, HASHER) as s:       # another process trusts the store's
        s.mapping(d).release()                     # check; damage at rest is fsck's
        assert d.hex() in {p.chunk for p in s.fsck().errors}
    (root / "verified").unlink()                   # without that record: checked again
    with ChunkStore.open(root, HASHER) as s:
        with pytest.raises(CorruptChunkError):
            s.mapping(d)


TRUNCATED = r"""
import os, sys
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore, CorruptChunkError
root = sys.argv[1]
with ChunkStore.open(root, Blake3Hasher({})) as s:
    first, second = (bytes.fromhex(h) for h in sys.argv[2:4])
    m = s.mapping(second)
    mm = m.map()
    assert s.get(second)                        # the store's own map of the pack exists too
    e = s.entry(second)
    os.truncate(s.pack_path(e.pack), e.offset + 100)   # an attack: cut the pack mid-chunk
    for what, call in (("mapping", lambda: s.mapping(second)),
                       ("mappings", lambda: s.mappings([first, second])),
                       ("get", lambda: s.get(second)), ("view", lambda: s.view(second))):
        try:
            call()
            print(what, "returned")
        except CorruptChunkError as exc:
            print(what, "CorruptChunkError:", exc)
    print("first still", s.get(first) == bytes(50_000))
"""


def test_a_pack_truncated_under_a_mapping_is_an_error_on_the_next_map(tmp_path: Path) -> None:
    """Run in a child: if anything touched pages past the new end, it would die of
    SIGBUS instead of printing the errors."""
    root = tmp_path / "nebula"
    with ChunkStore.open(root, HASHER, create=True) as s:
        first = s.put(bytes(50_000), mappable=True)
        second = s.put(random.Random(4).randbytes(50_000), mappable=True)
    proc = subprocess.run([sys.executable, "-c", TRUNCATED, str(root), first.hex(),
                           second.hex()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("mapping CorruptChunkError: chunk ") and "truncated" in lines[0]
    assert all("CorruptChunkError" in x and "truncated" in x for x in lines[1:4])
    assert lines[4] == "first still True"


def test_mappings_are_what_mapping_hands_out_and_an_error_leaves_nothing_leased(store) -> None:
    rnd = random.Random(15)
    blobs = [rnd.randbytes(n) for n in (5000, PAGE, 70_000)]
    ds = [store.put(b, mappable=True) for b in blobs]
    packed = store.put(TEXT)
    garbage = store.put(rnd.randbytes(30_000))
    store.release(garbage)
    order = [ds[2], ds[0], ds[2], ds[1]]
    got = store.mappings(order)
    for d, m in zip(order, got, strict=True):
        with store.mapping(d) as one:
            assert (m.digest, m.path, m.fd, m.offset, m.length) == \
                (d, one.path, one.fd, one.offset, one.length)
        mm = m.map()
        assert mm[:m.length] == blobs[ds.index(d)]
        mm.close()
    assert store.gc()["unreferenced_but_mapped"] == 1      # each mapping holds the lease
    for m in got[:-1]:
        m.release()
    assert store.gc()["unreferenced_but_mapped"] == 1      # ... until the last one goes
    got[-1].release()
    for bad, error in (([ds[0], packed], NotMappableError),
                       ([ds[1], bytes(32)], MissingChunkError)):
        with pytest.raises(error):
            store.mappings(bad)
    assert store.mappings([]) == []
    assert store.gc()["chunks_removed"] == 1 and not store.contains(garbage)   # none leased


def test_gc_leaves_a_leased_pack_alone_until_the_mapping_is_released(store) -> None:
    keep = store.put(random.Random(5).randbytes(20_000), mappable=True)
    garbage = [store.put(random.Random(i).randbytes(30_000)) for i in range(6, 12)]
    e = store.entry(keep)
    m = store.mapping(keep)
    mm = m.map()
    store.release_many(dict.fromkeys(garbage, 1))
    out = store.gc()
    assert out["chunks_removed"] == 0 and out["unreferenced_but_mapped"] == 6
    assert out["packs_removed"] == 0 and store.entry(keep) == e
    assert all(store.contains(d) for d in garbage)      # not punched under the mapping
    m.release()       # the Python mmap keeps a dup of the fd, and with it the lease
    assert store.gc()["unreferenced_but_mapped"] == 6
    mm.close()
    out = store.gc()
    assert out["chunks_removed"] == 6 and out["chunks_moved"] == 1 and out["packs_removed"] == 1
    moved = store.entry(keep)
    assert moved.pack != e.pack and moved.mappable and moved.offset % PAGE == 0
    with store.mapping(keep) as m2:
        assert m2.map()[:20_000] == store.get(keep)
    assert store.fsck().ok


HOLDER = r"""
import sys, time
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
s = ChunkStore.open(sys.argv[1], Blake3Hasher({}))
m = s.mapping(bytes.fromhex(sys.argv[2]))
mm = m.map()
print("mapped", flush=True)
time.sleep(600)
"""


def test_a_lease_lasts_as_long_as_the_mapper_and_not_longer(tmp_path: Path) -> None:
    """Another process's lease holds gc off; killing that process (a VMM crash) ends it."""
    root = tmp_path / "nebula"
    with ChunkStore.open(root, HASHER, create=True) as s:
        keep = s.put(random.Random(13).randbytes(20_000), mappable=True)
        junk = s.put(random.Random(14).randbytes(40_000))
        s.release(junk)
        vmm = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), keep.hex()],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert vmm.stdout.readline().strip() == "mapped"
            assert s.gc()["unreferenced_but_mapped"] == 1 and s.contains(junk)
        finally:
            vmm.send_signal(signal.SIGKILL)
            vmm.wait()
        out = s.gc()
        assert out["chunks_removed"] == 1 and not s.contains(junk)
        assert s.entry(keep).mappable and s.fsck().ok


def test_fsck_keeps_mappable_chunks_mappable(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = random.Random(15).randbytes(10_000)
    with ChunkStore.open(root, HASHER, create=True) as s:
        d = s.put(data, mappable=True)
        s.put(TEXT)
        e = s.entry(d)
    pack = root / "packs" / "pack-000001.dat"
    raw = bytearray(pack.read_bytes())
    at = next(i for i in range(0, len(raw), 64)
              if (r := parse_record(raw, i)) is not None and r.digest == d)
    assert at >= -(-(e.offset + e.raw) // PAGE) * PAGE   # after its last page
    raw[at + 40] ^= 1                    # damage its record
    pack.write_bytes(raw)
    with ChunkStore.open(root, HASHER) as s:
        rep = s.fsck()
        assert not rep.ok and "record is missing or damaged; its content is intact" in \
            rep.errors[0].what
        assert s.fsck(repair=True).repaired == 1
        e2 = s.entry(d)
        assert e2.mappable and e2.offset % PAGE == 0 and e2.offset != e.offset
        assert s.fsck().ok
        with s.mapping(d) as m:
            assert m.map()[:len(data)] == data
    # the index lost: fsck --repair re-indexes it from its record, still mappable
    os.unlink(root / "index.snap")
    os.unlink(root / "index.log")
    with ChunkStore.open(root, HASHER) as s:
        assert s.fsck(repair=True).repaired == 2
        assert s.entry(d).mappable and s.get(d) == data
