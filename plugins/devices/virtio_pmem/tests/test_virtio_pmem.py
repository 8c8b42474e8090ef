"""virtio-pmem driven as Linux's virtio_pmem driver would: the window is handed to the
VMM read-only and its guest address shows in config space, flushes are answered, bad
requests get an error status, hostile rings stop the device (fuzzed). Through the plugin,
a real host's volume becomes a window of its chunks mapped from the store's packs."""

from __future__ import annotations

import ctypes
import mmap
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given
from stellarium_virtio_pmem.device import EIO, OK, REQ_FLUSH, VirtioPmem
from stellarium_virtio_pmem.plugin import WINDOW_ALIGN

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile
from stellarium_core.cli.host import init_store
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore


class AnonWindow:
    """Two anonymous pages standing in for a composed base."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, 2 * mmap.PAGESIZE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.size = len(self.map)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _status(ring, head_addrs: list[int]) -> int:
    return struct.unpack("<I", ring.read(head_addrs[-1], 4))[0]


def test_the_window_is_mapped_read_only_and_its_place_is_the_config_space():
    window = AnonWindow()
    rig = Rig(VirtioPmem(window))
    assert rig.link.mapped == [(window.addr, window.size, True)]
    start, size = struct.unpack("<QQ", rig.dev.read_config(0, 16))
    assert (start, size) == (1 << 32, window.size)
    assert rig.dev.read_config(8, 8) == struct.pack("<Q", window.size)
    rig.close()
    assert window.closed


def test_flushes_are_answered_and_bad_requests_get_an_error_status():
    rig = Rig(VirtioPmem(AnonWindow()))
    ring = rig.rings[0]
    flush = ring.add([(struct.pack("<I", REQ_FLUSH), False), (4, True)])
    bogus = ring.add([(struct.pack("<I", 7), False), (4, True)])
    short = ring.add([(b"\0\0", False), (4, True)])            # type cut in half
    mute = ring.add([(struct.pack("<I", REQ_FLUSH), False)])   # nowhere to answer
    rig.kick(0)
    assert ring.used() == [(flush[0], 4), (bogus[0], 4), (short[0], 4), (mute[0], 0)]
    assert [_status(ring, h[1]) for h in (flush, bogus, short)] == [OK, EIO, EIO]
    assert rig.dev.metrics() == {"flushes": 2, "bad_requests": 2}
    assert rig.interrupts == 1
    rig.close()


def test_hostile_chain_asks_for_a_reset():
    rig = Rig(VirtioPmem(AnonWindow()))
    write_hostile(rig.rings[0], ([(("abs", 1 << 40), 64, 0, 0)], [0], 1, [b""]))
    rig.kick(0)
    assert rig.link.resets and "outside guest memory" in rig.link.resets[0]
    rig.close()


@pytest.fixture(scope="module")
def fuzz_rig():
    rig = Rig(VirtioPmem(AnonWindow()), ram_size=4 << 20)
    yield rig
    rig.close()


@fuzz_settings()
@given(program=fuzz_strategy())
def test_fuzz_random_rings(fuzz_rig, program):
    fuzz_rig.restart()
    write_hostile(fuzz_rig.rings[0], program)
    with time_limit(2.0):
        fuzz_rig.kick(0)
        fuzz_rig.turn()


# -- the plugin, over a real host's store ----------------------------------------------

GRID = 64 << 10


@pytest.fixture
def host_cfg(tmp_path: Path) -> tuple[Path, bytes]:
    """A host whose volume ``base`` holds 5 slots: data, zeros, data, data, a short end."""
    rnd = random.Random(3)
    disk = bytearray(rnd.randbytes(4 * GRID + 3 * 4096))
    disk[GRID:2 * GRID] = bytes(GRID)
    disk[2 * GRID:3 * GRID] = b"the same text over and over " * (GRID // 28) + bytes(GRID % 28)
    (tmp_path / "disk.raw").write_bytes(disk)
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    host = Host.from_config(cfg)
    init_store(host)
    with host.store as store:
        VolumeStore(host.store_path / "volumes", store, host.hasher) \
            .import_raw("base", tmp_path / "disk.raw").close()
    return cfg, bytes(disk)


def create(cfg: Path, params: dict) -> VirtioPmem:
    host = Host.from_config(cfg)
    return host.registry.create("device", "virtio-pmem", params, context=DeviceContext(host))


def test_plugin_maps_the_named_volume_chunk_by_chunk(host_cfg):
    cfg, disk = host_cfg
    dev = create(cfg, {"volume": "base"})
    w = dev.window
    try:
        assert w.size == WINDOW_ALIGN and w.chunks == 4         # the zero slot maps nothing
        assert ctypes.string_at(w.addr, len(disk)) == disk
        assert ctypes.string_at(w.addr + len(disk), w.size - len(disk)) == bytes(
            w.size - len(disk))
    finally:
        dev.close()
    with Host.from_config(cfg).store as store:     # each chunk now has a mappable copy
        vol = VolumeStore(store.root.parent / "volumes", store, store.hasher).open(
            "base", readonly=True)
        assert all(store.entry(d).mappable for d in vol.chunk_slots().values())
        vol.close()


def test_plugin_refuses_bad_params_and_missing_volumes(host_cfg):
    cfg, _ = host_cfg
    with pytest.raises(ConfigError, match="volume=NAME"):
        create(cfg, {})
    with pytest.raises(ConfigError, match="known keys: volume"):
        create(cfg, {"volume": "base", "image": "x"})
    with pytest.raises(StellarError, match="nope"):
        create(cfg, {"volume": "nope"})


def test_a_store_the_vmm_cannot_write_is_a_clear_error(host_cfg, monkeypatch):
    """Compressed chunks need a mappable copy; when the store refuses the write (a
    read-only mount, another user's store), the device says so and how to avoid it."""
    import stellarium_virtio_pmem.plugin as plugin

    def refuse(*_args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(plugin, "materialise", refuse)
    cfg, _ = host_cfg
    with pytest.raises(StellarError, match="cannot store mappable copies.*--mappable"):
        create(cfg, {"volume": "base"})


def test_a_restore_needs_the_window_where_the_guest_knew_it():
    from stellarium_core.virtio import StateError

    src = Rig(VirtioPmem(AnonWindow()))
    saved = src.dev.save_state()
    same = Rig(VirtioPmem(AnonWindow()))
    same.dev.restore_state(saved)                     # placed alike: accepted
    other = Rig(VirtioPmem(AnonWindow()))
    other.link.mapped.clear()
    other.dev.start = 2 << 32
    with pytest.raises(StateError, match="knew the window at 4294967296"):
        other.dev.restore_state(saved)
    with pytest.raises(StateError, match="not JSON"):
        same.dev.restore_state(b"\xff")
    for r in (src, same, other):
        r.close()
