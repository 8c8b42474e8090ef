"""The C request loop (blkring.c via native.py) against the Python one, on hostile rings.

Hypothesis builds a whole guest's worth of queue state: a descriptor table whose
addresses, lengths, flags and ``next`` links are anything (in range, out of guest
memory, looping, indirect, readable after writable), an available ring with any
heads and any index (also jumping by more than the queue size), EVENT_IDX on or
off, and request headers of every type over in-range, end-of-disk and absurd
sectors. The same state is served twice, once by a device whose disk the C loop
does not know (so Python serves every request) and once through the C loop, and
everything observable must match: guest memory, the disk's bytes, the ring
indices, whether the queue was given up, and the interrupts raised.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stellarium_virtio_stellar import native
from stellarium_virtio_stellar.device import VirtioStellar
from stellarium_virtio_stellar.disks import RawFileDisk

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
from stellarium_core.virtio import (
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RegionMemory,
    Virtqueue,
)
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.volume import VolumeStore

QSIZE = 8
DESC, AVAIL, USED, DATA = 0x0, 0x100, 0x200, 0x400
RAM = 0x4000
SECTORS = 64                                   # a 32 KiB disk
SHIFT = 13                                     # 8 KiB volume slots: requests span them

TYPES = st.sampled_from([0, 0, 0, 1, 1, 4, 8, 11, 13, 2, 0xFFFFFFFF])
SECTOR_NUMBERS = st.one_of(st.integers(0, SECTORS), st.sampled_from(
    [SECTORS - 1, SECTORS - 8, 2**63, 2**64 - 1, 2**55]))
ADDRS = st.one_of(st.integers(DATA, RAM - 1), st.sampled_from(
    [0, DESC, USED, RAM - 1, RAM, RAM + 16, 2**63, 2**64 - 16]))
LENGTHS = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 512, 513, 1024, 4096, 2**31]),
                    st.integers(0, 2048))
FLAGS = st.one_of(st.sampled_from([VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                   VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 0]),
                  st.just(VIRTQ_DESC_F_INDIRECT), st.integers(0, 7))
DESCRIPTOR = st.tuples(ADDRS, LENGTHS, FLAGS, st.integers(0, QSIZE))
HEADER = st.tuples(TYPES, SECTOR_NUMBERS)


def well_formed(head: int, kind: int, sector: int, nbytes: int) -> list[tuple]:
    """A chain as Linux builds it (header, data, status) at descriptors head.. (mod QSIZE)."""
    a, b, c = head, (head + 1) % QSIZE, (head + 2) % QSIZE
    hdr, buf, status = DATA + 0x40 * head, DATA + 0x400 + 0x800 * (head % 4), DATA + 0x3F0
    data_flags = VIRTQ_DESC_F_NEXT | (VIRTQ_DESC_F_WRITE if kind == 0 else 0)
    return [(a, (hdr, 16, VIRTQ_DESC_F_NEXT, b), (kind, sector)),
            (b, (buf, nbytes, data_flags, c), None),
            (c, (status + head, 1, VIRTQ_DESC_F_WRITE, 0), None)]


@st.composite
def rings(draw: st.DrawFn) -> dict:
    """Queue state: mostly well-formed requests, with any descriptor overwritten."""
    descs = draw(st.lists(DESCRIPTOR, min_size=QSIZE, max_size=QSIZE))
    headers: dict[int, tuple[int, int]] = {}
    for head in draw(st.lists(st.integers(0, QSIZE - 1), max_size=3, unique=True)):
        kind, sector = draw(HEADER)
        nbytes = draw(st.sampled_from([512, 1024, 2048, 0, 100, 8192]))
        for index, desc, hdr in well_formed(head, kind, sector, nbytes):
            descs[index] = desc
            if hdr is not None:
                headers[index] = hdr
    for index, desc in draw(st.lists(st.tuples(st.integers(0, QSIZE - 1), DESCRIPTOR),
                                     max_size=2)):
        descs[index] = desc
    heads = draw(st.lists(st.integers(0, QSIZE + 2), max_size=QSIZE))
    return {"descs": descs, "headers": headers, "heads": heads,
            "avail_idx": draw(st.one_of(st.just(len(heads)), st.integers(0, 0xFFFF))),
            "event_idx": draw(st.booleans()),
            "used_event": draw(st.integers(0, 0xFFFF)),
            "no_interrupt": draw(st.booleans()),
            "payload": draw(st.binary(min_size=64, max_size=64))}


def guest(ring: dict) -> bytearray:
    ram = bytearray(RAM)
    for i in range(DATA, RAM, 64):
        ram[i:i + 64] = ring["payload"]
    for i, (addr, length, flags, nxt) in enumerate(ring["descs"]):
        struct.pack_into("<QIHH", ram, DESC + 16 * i, addr & (2**64 - 1), length & 0xFFFFFFFF,
                         flags, nxt)
    for index, (kind, sector) in ring["headers"].items():
        addr = ring["descs"][index][0]
        if DATA <= addr <= RAM - 16:
            struct.pack_into("<IIQ", ram, addr, kind, 0, sector)
    struct.pack_into("<HH", ram, AVAIL, int(ring["no_interrupt"]), ring["avail_idx"])
    for i, head in enumerate(ring["heads"]):
        struct.pack_into("<H", ram, AVAIL + 4 + 2 * i, head)
    struct.pack_into("<H", ram, AVAIL + 4 + 2 * QSIZE, ring["used_event"])
    return ram


class Opaque:
    """The same disk behind a type the C loop does not know: Python serves everything."""

    def __init__(self, disk: object) -> None:
        self._disk = disk

    def __getattr__(self, name: str) -> object:
        return getattr(self._disk, name)


def serve(dev: VirtioStellar, ring: dict, kicks: int = 2) -> tuple:
    ram = guest(ring)
    mem = RegionMemory.over(ram)
    q = Virtqueue(QSIZE)
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    q.check(mem)
    q.event_idx = ring["event_idx"]
    interrupts = []
    feats = dev.features & ~(0 if ring["event_idx"] else VIRTIO_RING_F_EVENT_IDX)
    dev.activate(feats, mem, [q], lambda: interrupts.append(q.used_idx))
    for _ in range(kicks):
        dev.notify(0)
    return bytes(ram), q.last_avail, q.used_idx, q.signalled_used, dev.broken, interrupts


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    (d / "pristine").write_bytes(os.urandom(SECTORS * SECTOR))
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=rings(), readonly=st.booleans())
def test_c_loop_matches_python_on_a_raw_file(raw_dir, ring, readonly):
    results = []
    for name, wrap in (("python", Opaque), ("native", lambda d: d)):
        path = raw_dir / f"{name}.raw"
        path.write_bytes((raw_dir / "pristine").read_bytes())
        disk = RawFileDisk(path, readonly=readonly)
        dev = VirtioStellar(wrap(disk), serial="fuzz-disk", on_close=disk.close)
        try:
            results.append(serve(dev, ring))
        finally:
            dev.close()
        results.append(path.read_bytes())
    assert results[2] == results[0]
    assert results[3] == results[1]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> VolumeStore:
    d = tmp_path_factory.mktemp("vol")
    hasher = Blake3Hasher({})
    store = ChunkStore.open(d / "nebula", hasher, create=True)
    vols = VolumeStore(d / "volumes", store, hasher)
    (d / "base.raw").write_bytes(os.urandom(SECTORS * SECTOR // 2) + bytes(SECTORS * SECTOR // 2))
    vols.import_raw("base", d / "base.raw", shift=SHIFT).close()
    return vols


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring=rings())
def test_c_loop_matches_python_on_a_volume(volumes, ring):
    results = []
    for name, wrap in (("python", Opaque), ("native", lambda d: d)):
        volumes.clone("base", name)
        vol = volumes.open(name)
        dev = VirtioStellar(wrap(BlockDevice(vol)), serial="vol", on_close=vol.close)
        try:       # later kicks re-read slots the first one published or wrote
            results.append(serve(dev, ring, kicks=3))
        finally:
            dev.close()
        with volumes.open(name, readonly=True) as v:
            results.append(v.read(0, v.size))
        volumes.delete(name)
    assert results[2][1:] == results[0][1:]
    assert results[2][0] == results[0][0]
    assert results[3] == results[1]


def test_the_c_loop_serves_raw_files_and_volumes():
    """The comparison above is only worth something if one side really is the C loop."""
    assert native.supported(RawFileDisk.__new__(RawFileDisk))
    assert not native.supported(Opaque(None))


def test_a_volume_read_hashes_its_chunk_once_then_c_serves_it(volumes):
    """The first read of a slot goes to Python, which verifies and publishes the chunk;
    every later read of it is served by the C loop alone; a write unpublishes it."""
    from devtools.virtio_driver import BlkDriver

    volumes.clone("base", "once")
    vol = volumes.open("once")
    dev = VirtioStellar(BlockDevice(vol), serial="once", on_close=vol.close)
    try:
        drv = BlkDriver.inline(dev, ram_size=1 << 20)
        ring = dev._native
        assert ring is not None
        expect = vol.read(0, 4096)
        assert drv.request(0, 0, inlen=4096) == (0, expect)
        assert (ring.d.slowed, ring.d.served) == (1, 0) and 0 in ring._published
        for _ in range(3):
            assert drv.request(0, 2, inlen=2048) == (0, expect[1024:3072])
        assert (ring.d.slowed, ring.d.served) == (1, 3)
        assert drv.request(1, 1, out=b"w" * 512) == (0, b"")     # Python writes it...
        assert 0 not in ring._published                         # ...and C forgets slot 0
        assert drv.request(0, 0, inlen=1024) == (0, expect[:512] + b"w" * 512)
    finally:
        dev.close()
        volumes.delete("once")
