"""virtio-stellar driven through the core virtqueue contract, as a guest driver would,
against a real NEBULA ChunkStore and volume: reads, writes, flush, read-only, hostile requests."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from stellarium_virtio_stellar.device import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VirtioStellar,
)

from devtools.virtio_driver import AVAIL, DESC, HEAP, QSIZE, USED, BlkDriver
from stellarium_core.distribution import ImageStore, Importer
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.host import Host, init_store
from stellarium_core.nebula import ChunkStore
from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    DeviceState,
    HostPathsDevice,
    RegionMemory,
    VirtioDevice,
    Virtqueue,
)
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.volume import VolumeStore

DISK = 1 << 20                      # 2048 sectors
NSECT = DISK // SECTOR


class Guest(BlkDriver):
    """The driver side over bytearray guest RAM; the device serves each kick inline."""

    def __init__(self, dev: VirtioStellar) -> None:
        ram = bytearray(8 << 20)
        self.dev, self.mem = dev, RegionMemory.over(ram)
        self.interrupts = 0
        q = Virtqueue(QSIZE)
        q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
        q.check(self.mem)
        dev.activate(dev.features, self.mem, [q], self._irq)
        super().__init__(ram, lambda: dev.notify(0))

    def _irq(self) -> None:
        self.interrupts += 1


@pytest.fixture
def vols(tmp_path: Path) -> Iterator[VolumeStore]:
    hasher = Blake3Hasher({})
    with ChunkStore.open(tmp_path / "nebula", hasher, create=True) as store:
        yield VolumeStore(tmp_path / "volumes", store, hasher)


@pytest.fixture
def image(tmp_path: Path) -> bytes:
    data = os.urandom(DISK)
    (tmp_path / "disk.raw").write_bytes(data)
    return data


def make(vols: VolumeStore, tmp_path: Path, *, readonly: bool = False) -> Guest:
    if not vols.exists("disk"):
        vols.import_raw("disk", tmp_path / "disk.raw").close()
    vol = vols.open("disk", readonly=readonly)
    return Guest(VirtioStellar(BlockDevice(vol), serial="disk", on_close=vol.close))


def test_is_a_modern_virtio_blk_device_with_capacity_in_sectors(vols, tmp_path, image):
    g = make(vols, tmp_path)
    dev = g.dev
    assert isinstance(dev, VirtioDevice)
    DeviceState(dev)                                   # the transport accepts it
    assert dev.device_id == 2 and dev.features & VIRTIO_F_VERSION_1
    assert dev.features & VIRTIO_BLK_F_FLUSH and not dev.features & VIRTIO_BLK_F_RO
    capacity, size_max, seg_max = struct.unpack("<QII", dev.read_config(0, 16))
    assert capacity == NSECT and size_max > 0 and seg_max > 0
    assert struct.unpack("<I", dev.read_config(20, 4))[0] == SECTOR     # blk_size
    assert dev.read_config(56, 8) == b"\x01" + b"\0" * 7                # past the end: zeros
    dev.close()


def test_read_returns_the_volume_bytes(vols, tmp_path, image):
    g = make(vols, tmp_path)
    assert g.request(T_IN, 0, inlen=4096) == (S_OK, image[:4096])
    # A read spanning a 64 KiB chunk boundary, and the last sector.
    assert g.request(T_IN, 120, inlen=16 * SECTOR) == (S_OK, image[120 * 512:136 * 512])
    assert g.request(T_IN, NSECT - 1, inlen=SECTOR) == (S_OK, image[-SECTOR:])
    assert g.interrupts == 3
    g.dev.close()


def test_read_scatters_across_several_guest_buffers(vols, tmp_path, image):
    g = make(vols, tmp_path)
    # Sector 125: the 64 KiB chunk boundary at sector 128 falls inside the second buffer.
    addrs = g.submit([(struct.pack("<IIQ", T_IN, 0, 125), False), (1024, True), (1024, True),
                      (0, True), (1537, True)])  # the last buffer also carries the status
    assert g.used() == (0, 3585)
    got = g.mem.read(addrs[1], 1024) + g.mem.read(addrs[2], 1024) + g.mem.read(addrs[4], 1536)
    assert got == image[125 * 512:125 * 512 + 3584] and g.mem.read(addrs[4] + 1536, 1)[0] == S_OK
    g.dev.close()


def test_write_read_back_and_flush_persists(vols, tmp_path, image):
    g = make(vols, tmp_path)
    new = os.urandom(3 * SECTOR)
    assert g.request(T_OUT, 127, out=new) == (S_OK, b"")          # crosses a chunk boundary
    assert g.request(T_IN, 127, inlen=len(new)) == (S_OK, new)
    assert g.request(T_FLUSH) == (S_OK, b"")
    # The flush made it durable: another reader of the catalog sees it while we hold the volume.
    with vols.open("disk", readonly=True) as v:
        assert v.read(127 * SECTOR, len(new)) == new
        assert v.read(0, 127 * SECTOR) == image[:127 * SECTOR]
    g.dev.close()


def test_unflushed_writes_are_kept_when_the_device_closes(vols, tmp_path, image):
    g = make(vols, tmp_path)
    assert g.request(T_OUT, 5, out=b"z" * SECTOR)[0] == S_OK
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        assert v.read(5 * SECTOR, SECTOR) == b"z" * SECTOR


def test_read_only_refuses_writes_and_leaves_the_volume_unchanged(vols, tmp_path, image):
    g = make(vols, tmp_path, readonly=True)
    assert g.dev.features & VIRTIO_BLK_F_RO
    assert g.request(T_OUT, 0, out=b"x" * SECTOR)[0] == S_IOERR
    seg = struct.pack("<QII", 0, 8, 0)
    assert g.request(T_DISCARD, out=seg)[0] == S_UNSUPP
    assert g.request(T_WRITE_ZEROES, out=seg)[0] == S_UNSUPP
    assert g.request(T_FLUSH)[0] == S_OK
    assert g.request(T_IN, 0, inlen=SECTOR) == (S_OK, image[:SECTOR])
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        assert v.read(0, DISK) == image


@pytest.mark.parametrize("sector, count", [(NSECT, 1), (NSECT - 1, 2), (2**64 - 1, 1)])
def test_out_of_range_sectors_are_io_errors(vols, tmp_path, image, sector, count):
    g = make(vols, tmp_path)
    assert g.request(T_IN, sector, inlen=count * SECTOR)[0] == S_IOERR
    assert g.request(T_OUT, sector, out=b"q" * count * SECTOR)[0] == S_IOERR
    seg = struct.pack("<QII", sector, count, 0)
    assert g.request(T_WRITE_ZEROES, out=seg)[0] == S_IOERR
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        assert v.read(0, DISK) == image


HDR_IN, HDR_OUT = struct.pack("<IIQ", T_IN, 0, 0), struct.pack("<IIQ", T_OUT, 0, 0)


@pytest.mark.parametrize("bufs, status", [
    ([(b"\0" * 8, False), (1, True)], S_IOERR),                           # header too short
    ([(1, True)], S_IOERR),                                              # no header at all
    ([(HDR_IN, False), (b"x" * 512, False), (513, True)], S_IOERR),      # IN with data to us
    ([(HDR_OUT, False), (b"x" * 512, False), (513, True)], S_IOERR),     # OUT into guest buffer
    ([(HDR_IN, False), (301, True)], S_IOERR),                           # not whole sectors
    ([(HDR_OUT, False), (b"x" * 300, False), (1, True)], S_IOERR),
    ([(struct.pack("<IIQ", 99, 0, 0), False), (1, True)], S_UNSUPP),     # unknown type
    ([(struct.pack("<IIQ", T_DISCARD, 0, 0), False), (b"x" * 15, False), (1, True)],
     S_IOERR),                                                           # partial segment
    ([(struct.pack("<IIQ", T_DISCARD, 0, 0), False), (struct.pack("<QII", 0, 1, 1), False),
      (1, True)], S_UNSUPP),                                             # unmap on discard
])
def test_malformed_requests_get_a_status_not_an_exception(vols, tmp_path, image, bufs, status):
    g = make(vols, tmp_path)
    addrs = g.submit(bufs)
    head, written = g.used()
    assert head == 0 and written == 1
    assert g.mem.read(addrs[-1] + bufs[-1][0] - 1, 1)[0] == status
    assert g.request(T_IN, 0, inlen=SECTOR) == (S_OK, image[:SECTOR])  # still serving
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        assert v.read(0, DISK) == image


def test_chain_without_a_status_byte_is_returned_empty(vols, tmp_path, image):
    g = make(vols, tmp_path)
    g.submit([(HDR_OUT, False), (b"x" * 512, False)])
    assert g.used() == (0, 0)
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        assert v.read(0, SECTOR) == image[:SECTOR]


def test_hostile_ring_stops_the_queue_until_reset(vols, tmp_path, image, caplog):
    g = make(vols, tmp_path)
    # Descriptor 0 points to itself: the queue rejects the chain; the device must not raise.
    g.mem.write(DESC, struct.pack("<QIHH", HEAP, 16, VIRTQ_DESC_F_NEXT, 0))
    g.mem.write(AVAIL + 4, struct.pack("<H", 0))
    g.mem.write(AVAIL + 2, struct.pack("<H", 1))
    g.dev.notify(0)
    assert g.dev.broken and g.used() is None
    said = [r.getMessage() for r in caplog.records if "ring is unusable" in r.getMessage()]
    assert len(said) == 1 and "loop" in said[0], said         # one line, with the reason
    g.dev.notify(0)                                    # further kicks are ignored quietly
    assert len([r for r in caplog.records if "ring is unusable" in r.getMessage()]) == 1
    g.dev.reset()
    g2 = Guest(g.dev)                                  # the driver re-initialises the device
    assert g2.request(T_IN, 0, inlen=SECTOR) == (S_OK, image[:SECTOR])
    g.dev.close()


def test_get_id_returns_the_serial(vols, tmp_path, image):
    g = make(vols, tmp_path)
    assert g.request(T_GET_ID, inlen=20) == (S_OK, b"disk".ljust(20, b"\0"))
    g.dev.close()


def test_discard_and_write_zeroes_read_back_as_zeros(vols, tmp_path, image):
    g = make(vols, tmp_path)
    segs = struct.pack("<QII", 0, 128, 0) + struct.pack("<QII", 300, 3, 0)
    assert g.request(T_DISCARD, out=segs)[0] == S_OK
    assert g.request(T_WRITE_ZEROES, out=struct.pack("<QII", 1000, 1, 1))[0] == S_OK
    assert g.request(T_FLUSH)[0] == S_OK
    g.dev.close()
    with vols.open("disk", readonly=True) as v:
        got = v.read(0, DISK)
    want = bytearray(image)
    for s, n in ((0, 128), (300, 3), (1000, 1)):
        want[s * SECTOR:(s + n) * SECTOR] = bytes(n * SECTOR)
    assert got == want


# -- the plugin hook, through the registry and a real host config ----------------------


@pytest.fixture
def host_cfg(tmp_path: Path, image: bytes) -> Path:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    host = Host.from_config(cfg)
    init_store(host)
    with host.store as store:
        VolumeStore(host.store_path / "volumes", store, host.hasher) \
            .import_raw("root", tmp_path / "disk.raw").close()
    return cfg


def create(cfg: Path, params: dict) -> VirtioStellar:
    """The device through the registry, as a VMM makes it for the host ``cfg`` configures."""
    host = Host.from_config(cfg)
    return host.registry.create("device", "virtio-stellar", params, context=DeviceContext(host))


def test_plugin_opens_the_named_volume_from_the_host_store(host_cfg, image):
    dev = create(host_cfg, {"volume": "root", "readonly": "true"})
    assert isinstance(dev, VirtioStellar) and dev.features & VIRTIO_BLK_F_RO
    g = Guest(dev)
    assert g.request(T_IN, 2, inlen=SECTOR) == (S_OK, image[2 * SECTOR:3 * SECTOR])
    dev.close()


def test_plugin_declares_its_store_for_the_vmm_sandbox(host_cfg, tmp_path):
    """What a confined VMM must still reach: the store, writable only for a writable disk,
    and beside a read-only one PHOTON's counters (the hot tier, read-only, once it exists)."""
    store = str(tmp_path / "store")
    counters = (str(tmp_path / "store" / "tiers"), True)
    (tmp_path / "store" / "tiers").mkdir(exist_ok=True)
    for params, writes in (({"volume": "root"}, True),
                           ({"volume": "root", "readonly": "true"}, False)):
        dev = create(host_cfg, params)
        assert isinstance(dev, HostPathsDevice)
        paths = dev.host_paths()
        assert paths[0] == (store, writes)
        assert (counters in paths) is not writes, paths
        assert all(not w for p, w in paths[1:] if p != counters[0]), paths
        dev.close()


@pytest.mark.parametrize("params, error, match", [
    ({}, ConfigError, "exactly one of volume=NAME or image=NAME"),
    ({"volume": "root", "image": "debian"}, ConfigError, "exactly one of"),
    ({"image": "debian", "readonly": "false"}, ConfigError, "always read-only"),
    ({"image": "nope"}, StellarError, "no image named 'nope'"),
    ({"volume": "root", "readonly": "maybe"}, ConfigError, "true or false"),
    ({"volume": "root", "size": "1"}, ConfigError, "unknown key"),
    ({"volume": "root", "config": "/x.toml"}, ConfigError, "params.config: unknown key"),
    ({"volume": "nope"}, StellarError, "no volume named 'nope'"),
    ({"volume": "../x"}, StellarError, "bad volume name"),
])
def test_plugin_rejects_bad_params_clearly(host_cfg, params, error, match):
    with pytest.raises(error, match=match):
        create(host_cfg, params)


def test_writable_plugin_holds_the_writer_lock(host_cfg):
    params = {"volume": "root"}
    dev = create(host_cfg, params)
    with pytest.raises(StellarError, match="open for writing elsewhere"):
        create(host_cfg, params)
    dev.close()
    create(host_cfg, params).close()


def test_plugin_serves_an_image_vm_form_read_only(host_cfg, tmp_path):
    """image=NAME: the EROFS disk over the image's own chunks, built on first use."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/debian_version").write_text("12.99\n")
    host = Host.from_config(host_cfg)
    with host.store:
        Importer(ImageStore.for_host(host), host.chunker, host.hasher).import_path(tree, "deb")
    dev = create(host_cfg, {"image": "deb"})
    assert dev.features & VIRTIO_BLK_F_RO and dev.serial == b"deb"
    g = Guest(dev)
    status, sb = g.request(T_IN, 2, inlen=SECTOR)        # bytes 1024..1535: the superblock
    assert status == S_OK and sb[:4] == (0xE0F5E1E2).to_bytes(4, "little")
    assert g.request(T_OUT, 0, out=bytes(SECTOR))[0] == S_IOERR
    m = dev.metrics()                                     # nothing else holds its chunks
    assert m["chunks"] > 0 and m["shared_chunks"] == 0 and m["errors"] == 1
    dev.close()


def test_metrics_count_requests_bytes_errors_latency_and_shared_chunks(host_cfg, tmp_path):
    """What the VMM's metrics lines report for this device: a clone shares every chunk
    with its source until the guest writes; an image disk shares none with a volume."""
    host = Host.from_config(host_cfg)
    with host.store as store:
        VolumeStore(host.store_path / "volumes", store, host.hasher).clone("root", "twin")
    dev = create(host_cfg, {"volume": "root"})
    g = Guest(dev)
    start = dev.metrics()
    assert start["chunks"] == DISK // (64 << 10) == start["shared_chunks"]  # all in the clone
    assert (start["requests"], start["errors"], start["latency_us_avg"]) == (0, 0, 0.0)
    assert g.request(T_IN, 0, inlen=4096)[0] == S_OK
    assert g.request(T_OUT, 0, out=os.urandom(SECTOR))[0] == S_OK   # chunk 0 becomes private
    assert g.request(T_IN, NSECT, inlen=SECTOR)[0] == S_IOERR
    assert g.request(T_FLUSH)[0] == S_OK                 # sharing counts flushed chunks
    m = dev.metrics()
    assert (m["requests"], m["errors"], m["read_bytes"], m["write_bytes"]) == (4, 1, 4096, SECTOR)
    assert 0 < m["latency_us_avg"] <= m["latency_us_max"]
    assert (m["chunks"], m["shared_chunks"]) == (start["chunks"], start["chunks"] - 1)
    dev.close()
