"""TinyVol format, DeltaVol/ShareVol operations, refcounts and the sector view."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from stellarium_core.errors import StellarError
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes import tinyvol
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.tinyvol import ChunkRef, ManifestError, TinyVol
from stellarium_core.volumes.volume import VolumeError, VolumeStore

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CS = 64 * KiB


def live_refs(store) -> dict[bytes, int]:
    return {d: e.refs for d, e in store.items() if e.refs}


@pytest.fixture
def vols(tmp_path, store, hasher):
    return VolumeStore(tmp_path / "volumes", store, hasher)


def test_empty_10gib_volume_is_64_bytes(vols):
    vols.create("empty", 10 * GiB).close()
    assert vols.path("empty").stat().st_size == 64
    m = tinyvol.decode(vols.path("empty").read_bytes())
    assert (m.size, m.chunk_size, m.refs) == (10 * GiB, CS, {})


def test_manifest_roundtrip_and_48_bytes_per_chunk():
    m = TinyVol(size=10 * GiB + 123, base=bytes(range(32)))
    m.refs[0] = ChunkRef(b"a" * 32, CS)
    m.refs[163840] = ChunkRef(b"b" * 32, 123)  # the short last slot
    m.refs[7] = ChunkRef(bytes(32), CS, tinyvol.REF_ZERO)
    data = tinyvol.encode(m)
    assert len(data) == 64 + 3 * 48
    assert tinyvol.decode(data) == m


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "version", "extend"])
def test_damaged_manifest_is_rejected(vols, damage):
    with vols.create("v", 4 * CS) as v:
        v.write(0, b"x" * 100)
    p = vols.path("v")
    good = p.read_bytes()
    bad = bytearray(good)
    if damage == "truncate":
        bad = bad[:-5]
    elif damage == "flip":
        bad[70] ^= 1
    elif damage == "magic":
        bad[0] = ord("X")
    elif damage == "version":
        bad[8] = 9
    else:
        bad += b"\0" * 48
    p.write_bytes(bytes(bad))
    with pytest.raises(ManifestError):
        vols.open("v")
    assert p.read_bytes() == bytes(bad)  # nothing rewritten


@pytest.mark.parametrize("cache_slots", [2, 1024])
def test_unaligned_reads_and_writes_spanning_chunks(tmp_path, store, hasher, cache_slots):
    """With a 2-slot cache, dirty slots spill to NEBULA mid-way and must read back."""
    vols = VolumeStore(tmp_path / "volumes", store, hasher, cache_slots=cache_slots)
    rnd = random.Random(1)
    size = 10 * CS + 777
    model = bytearray(size)
    with vols.create("v", size) as v:
        for _ in range(200):
            off = rnd.randrange(size)
            n = rnd.randrange(min(3 * CS, size - off) + 1)
            blob = rnd.randbytes(n)
            v.write(off, blob)
            model[off:off + n] = blob
            roff = rnd.randrange(size)
            rn = rnd.randrange(size - roff + 1)
            assert v.read(roff, rn) == model[roff:roff + rn]
    with vols.open("v") as v:
        assert v.read(0, size) == model


def test_zero_chunks_are_not_stored(vols, store):
    with vols.create("v", 8 * CS) as v:
        v.write(CS, b"\1" * CS)
        v.write(3 * CS, bytes(CS))
        v.write(5 * CS + 10, b"\2")
        v.write(5 * CS + 10, b"\0")  # back to zeros before flush
    m = tinyvol.decode(vols.path("v").read_bytes())
    assert sorted(m.refs) == [1]
    assert len(live_refs(store)) == 1


def test_out_of_range_and_readonly_refuse_and_change_nothing(vols):
    with vols.create("v", 2 * CS) as v:
        v.write(0, b"abc")
    before = vols.path("v").read_bytes()
    with vols.open("v") as v:
        for off, n in ((2 * CS, 1), (2 * CS - 1, 2), (-1, 1)):
            with pytest.raises(VolumeError, match="outside"):
                v.write(off, b"z" * n)
            with pytest.raises(VolumeError, match="outside"):
                v.read(off, n)
    with vols.open("v", readonly=True) as ro:
        with pytest.raises(VolumeError, match="read-only"):
            ro.write_zeroes(0, 1)
    vols.snapshot("v", "snap")
    with vols.open("snap") as s:
        with pytest.raises(VolumeError, match="read-only"):
            s.write(0, b"zzz")
        assert s.read(0, 3) == b"abc"
    assert vols.path("v").read_bytes() == before


def test_clone_is_cow_and_refcounts_balance(vols, store):
    data = os.urandom(3 * CS)
    with vols.create("a", 4 * CS) as a:
        a.write(0, data)
    vols.clone("a", "b")
    assert set(live_refs(store).values()) == {2}
    with vols.open("b") as b:
        b.write(CS + 5, b"new")
    with vols.open("a") as a:
        assert a.read(0, 3 * CS) == data  # the shared chunk is unchanged
    with vols.open("b") as b:
        assert b.read(CS, 8) == data[CS:CS + 5] + b"new"
    vols.delete("b")
    vols.delete("a")
    assert live_refs(store) == {}
    assert vols.names() == []


def test_commit_sharevol_base_and_deltas(vols, store):
    img = bytearray(os.urandom(6 * CS))
    img[2 * CS:3 * CS] = bytes(CS)
    with vols.create("gold", 6 * CS) as g:
        g.write(0, img)
    base = vols.commit("gold")
    assert vols.path("gold").stat().st_size == 64
    assert (vols.bases / (base.hex() + ".tinyvol")).exists()
    for i in range(3):
        vols.clone("gold", f"c{i}")
        assert vols.path(f"c{i}").stat().st_size == 64
    with vols.open("c0") as c:
        c.write(CS, b"\xff" * CS)          # replace one base chunk
        c.write_zeroes(4 * CS, CS)         # mask a base chunk with ZERO
        c.write(2 * CS + 1, b"q")          # write into a base hole
    m = tinyvol.decode(vols.path("c0").read_bytes())
    assert len(vols.path("c0").read_bytes()) == 64 + 3 * 48
    assert m.refs[4].zero
    with vols.open("c0") as c:
        want = bytearray(img)
        want[CS:2 * CS] = b"\xff" * CS
        want[4 * CS:5 * CS] = bytes(CS)
        want[2 * CS + 1] = ord("q")
        assert c.read(0, 6 * CS) == want
    with vols.open("c1") as c:
        assert c.read(0, 6 * CS) == img
    # writing the base's own bytes back leaves no delta entry
    with vols.open("c1") as c:
        c.write(0, img[:CS])
    assert vols.path("c1").stat().st_size == 64
    new = vols.commit("c0")
    assert new != base
    with vols.open("c0") as c:
        assert c.read(0, 6 * CS) == want
    for n in ("gold", "c0", "c1", "c2"):
        vols.delete(n)
    assert live_refs(store) == {}
    assert list(vols.bases.iterdir()) == []


def test_missing_base_is_a_clear_error(vols):
    with vols.create("g", 2 * CS) as g:
        g.write(0, b"x")
    base = vols.commit("g")
    (vols.bases / (base.hex() + ".tinyvol")).unlink()
    before = vols.path("g").read_bytes()
    with pytest.raises(VolumeError, match="missing"):
        vols.open("g")
    with pytest.raises(VolumeError, match="missing"):
        vols.clone("g", "h")
    assert not vols.exists("h")
    assert vols.path("g").read_bytes() == before


def test_import_export_raw_roundtrip(vols, tmp_path, store):
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(5 * CS + 1000)
        fh.seek(CS + 3)
        fh.write(os.urandom(CS))
        fh.seek(5 * CS + 999)
        fh.write(b"E")
    vols.import_raw("d", raw).close()
    assert len(tinyvol.decode(vols.path("d").read_bytes()).refs) == 3
    out = tmp_path / "out.raw"
    vols.export_raw("d", out)
    assert out.read_bytes() == raw.read_bytes()


def test_existing_names_and_bad_names(vols):
    vols.create("v", CS).close()
    with pytest.raises(VolumeError, match="exists"):
        vols.create("v", CS)
    with pytest.raises(VolumeError, match="exists"):
        vols.clone("v", "v")
    with pytest.raises(StellarError, match="bad volume name"):
        vols.create("../x", CS)
    with pytest.raises(VolumeError, match="no volume"):
        vols.open("nope")


def test_blockdev_sectors(vols):
    with vols.create("v", 4 * CS) as v:
        dev = BlockDevice(v)
        assert dev.sectors == 4 * CS // SECTOR
        dev.write(127, b"\7" * 3 * SECTOR)  # spans the first chunk boundary
        assert dev.read(127, 3) == b"\7" * 3 * SECTOR
        buf = bytearray(2 * SECTOR)
        dev.readinto(128, buf)
        assert buf == b"\7" * 2 * SECTOR
        assert b"".join(dev.read_views(126, 4)) == bytes(SECTOR) + b"\7" * 3 * SECTOR
        dev.discard(128, 1)
        dev.write_zeroes(0, CS // SECTOR)  # whole chunk becomes a hole
        dev.flush()
        assert dev.read(127, 3) == bytes(2 * SECTOR) + b"\7" * SECTOR
        with pytest.raises(VolumeError, match="outside"):
            dev.read(dev.sectors, 1)
        with pytest.raises(VolumeError, match="whole sectors"):
            dev.write(0, b"x")


def test_shared_chunk_reads_are_zero_copy(vols):
    blob = os.urandom(CS)  # incompressible, so NEBULA stores it raw in the pack
    with vols.create("g", 2 * CS) as g:
        g.write(0, blob)
    vols.commit("g")
    vols.clone("g", "c")
    with vols.open("c") as c:
        views = list(BlockDevice(c).read_views(0, 2 * CS // SECTOR))
    assert isinstance(views[0].obj, mmap.mmap)  # a slice of the pack mapping, not a copy
    assert bytes(views[0]) == blob and bytes(views[1]) == bytes(CS)


def test_one_writer_at_a_time(vols):
    with vols.create("v", CS) as v:
        v.write(0, b"first")
        with pytest.raises(VolumeError, match="open for writing"):
            vols.open("v")
        with pytest.raises(VolumeError, match="open for writing"):
            vols.delete("v")
        with vols.open("v", readonly=True) as r:
            assert r.read(0, 5) == bytes(5)  # readers see the last flush
    with vols.open("v") as v:
        assert v.read(0, 5) == b"first"
    vols.snapshot("v", "s")
    with pytest.raises(VolumeError, match="read-only"):
        vols.commit("s")
    vols.delete("v")
    assert not vols.exists("v") and vols.exists("s")


def test_failed_manifest_write_frees_nothing(vols, store, monkeypatch):
    """If the manifest cannot be written, the chunks it still lists keep their references."""
    old = os.urandom(CS)
    with vols.create("v", CS) as v:
        v.write(0, old)
    before = vols.path("v").read_bytes()
    v = vols.open("v")
    new = os.urandom(CS)
    v.write(0, new)

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        v.flush()
    monkeypatch.undo()
    assert vols.path("v").read_bytes() == before
    old_digest = tinyvol.decode(before).refs[0].digest
    assert live_refs(store)[old_digest] == 1  # still referenced, still readable
    with vols.open("v", readonly=True) as r:
        assert r.read(0, CS) == old
    v.close()  # retrying once there is space again succeeds
    with vols.open("v") as w:
        assert w.read(0, CS) == new


def test_import_base_from_elsewhere(tmp_path, hasher):
    """A base published by one store is adopted by another holding the same chunks."""
    blob = os.urandom(CS)
    with ChunkStore.open(tmp_path / "a/nebula", hasher, create=True) as sa:
        va = VolumeStore(tmp_path / "a/volumes", sa, hasher)
        with va.create("g", 3 * CS) as g:
            g.write(CS, blob)
        digest = va.commit("g")
        data = va._base_path(digest).read_bytes()
    with ChunkStore.open(tmp_path / "b/nebula", hasher, create=True) as sb:
        vb = VolumeStore(tmp_path / "b/volumes", sb, hasher)
        with pytest.raises(VolumeError, match="not in the store"):
            vb.import_base("vm", data)
        with pytest.raises(ManifestError):
            vb.import_base("vm", data[:-1])
        assert vb.names() == [] and list(vb.bases.iterdir()) == []
        sb.put(blob)
        with vb.import_base("vm", data) as v:
            assert v.base.digest == digest and v.read(CS, CS) == blob
        with vb.create("vm2", base=digest) as v2:
            assert v2.size == 3 * CS
        assert live_refs(sb)[hasher.digest(blob)] == 2  # our put + the base's reference
        vb.delete("vm")
        vb.delete("vm2")
        assert live_refs(sb)[hasher.digest(blob)] == 1 and list(vb.bases.iterdir()) == []


def test_failed_chunk_write_keeps_dirty_data(vols, store, monkeypatch):
    """A chunk-store failure during flush leaves the old state listed and the writes pending."""
    with vols.create("v", 2 * CS) as v:
        v.write(0, b"old")
    before = vols.path("v").read_bytes()
    v = vols.open("v")
    v.write(0, b"new")

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(StellarError):
        v.flush()
    monkeypatch.undo()
    assert vols.path("v").read_bytes() == before
    assert v.read(0, 3) == b"new"
    v.close()
    with vols.open("v", readonly=True) as r:
        assert r.read(0, 3) == b"new"
