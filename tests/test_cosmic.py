"""Cosmic Packs: format checks, addressability, and the space they save on a real rootfs."""

from __future__ import annotations

import os

import pytest

from stellarium_core.nebula import cosmic
from stellarium_core.nebula.cosmic import PackError
from stellarium_core.plugins import Registry
from stellarium_core.volumes.filetree import capture, footprint, release


def test_pack_slots_are_addressable_and_verified(hasher):
    files = [os.urandom(n) for n in (1, 100, 4095, 0, 77)]
    pack = cosmic.encode([(hasher.digest(f), f) for f in files])
    assert len(pack) == 64 + 48 * len(files) + sum(map(len, files))
    for slot, f in enumerate(files):
        assert cosmic.read_slot(pack, slot, hasher, expect=hasher.digest(f)) == f
    with pytest.raises(PackError, match="does not match"):
        cosmic.read_slot(pack, 1, hasher, expect=hasher.digest(files[2]))
    with pytest.raises(PackError, match="no slot"):
        cosmic.read_slot(pack, 5, hasher)


@pytest.mark.parametrize("damage", ["flip", "truncate", "magic"])
def test_damaged_pack_is_rejected(hasher, damage):
    pack = bytearray(cosmic.encode([(hasher.digest(b"abc"), b"abc")]))
    if damage == "flip":
        pack[-1] ^= 1
    elif damage == "truncate":
        pack = pack[:80]
    else:
        pack[:8] = b"NOTAPACK"
    with pytest.raises(PackError):
        cosmic.read_slot(bytes(pack), 0, hasher)


def test_packer_fills_64k_packs_and_dedups(store, hasher):
    with store.batch() as b:
        packer = cosmic.Packer(b, hasher)
        placed = [packer.add(os.urandom(3000)) for _ in range(50)]
        again = packer.add(b"same")
        assert packer.add(b"same") == again
        packer.seal()
    assert len(packer.packs) == 3  # 21 x (3000 + 48) bytes fit one 64 KiB pack
    for p in packer.packs:
        assert store.size(p) <= cosmic.PACK_SIZE
    for digest, ps in placed:
        assert cosmic.read_slot(store.get(ps.pack), ps.slot, hasher) is not None
        assert hasher.digest(cosmic.read_slot(store.get(ps.pack), ps.slot, hasher)) == digest


def test_small_files_share_chunks(tmp_path, store, hasher):
    chunker = Registry().create("chunker", "fastcdc", {})
    for i in range(200):
        (tmp_path / "t").mkdir(exist_ok=True)
        (tmp_path / "t" / f"f{i}").write_bytes(os.urandom(100 + i))
    packed = capture(tmp_path / "t", store, chunker, hasher)
    loose = capture(tmp_path / "t", store, chunker, hasher, cosmic_packs=False)
    fp, fl = footprint(packed, store), footprint(loose, store)
    assert fl["chunks"] == 200 and fp["chunks"] == 1
    assert fp["pack_bytes"] < fl["pack_bytes"]   # one record and index entry, not 200
    release(packed, store)
    release(loose, store)
    assert all(e.refs == 0 for _, e in store.items())


@pytest.mark.slow
def test_cosmic_packs_save_space_on_debian_rootfs(tmp_path, store, hasher):
    try:
        from devtools.rootfs import debian_rootfs
        src = debian_rootfs()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no Debian rootfs available: {exc}")
    chunker = Registry().create("chunker", "fastcdc", {})
    fp = footprint(capture(src, store, chunker, hasher), store)
    fl = footprint(capture(src, store, chunker, hasher, cosmic_packs=False), store)
    print(f"\nrootfs with Cosmic Packs: {fp}\nrootfs without:           {fl}")
    assert fp["chunks"] < fl["chunks"] and fp["pack_bytes"] < fl["pack_bytes"]
