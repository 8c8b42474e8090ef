"""The ``virtio-blk`` plugin: the virtio-stellar request logic over a raw image file,
driven through the core virtqueue contract with a real file on disk."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from stellarium_virtio_stellar.device import (
    S_IOERR,
    S_OK,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VIRTIO_BLK_F_RO,
    VirtioStellar,
)
from stellarium_virtio_stellar.disks import Disk, DiskError, RawFileDisk

from devtools.virtio_driver import BlkDriver
from stellarium_core.config import parse
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.host import Host
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.volume import VolumeStore

DISK = 1 << 20
NSECT = DISK // SECTOR



def create(params: dict) -> VirtioStellar:
    """The device through the registry with a creation context, as the VMM makes it (a
    raw-file disk needs nothing from the host)."""
    host = Host(parse({}, None))
    return host.registry.create("device", "virtio-blk", params, context=DeviceContext(host))

@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(DISK)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


def test_both_disks_satisfy_the_backend_protocol(image, tmp_path):
    disk = RawFileDisk(image[0])
    assert isinstance(disk, Disk) and disk.sectors == NSECT and not disk.readonly
    disk.close()
    hasher = Blake3Hasher({})
    with ChunkStore.open(tmp_path / "nebula", hasher, create=True) as store, \
            VolumeStore(tmp_path / "volumes", store, hasher).create("v", DISK) as vol:
        assert isinstance(BlockDevice(vol), Disk)


def test_read_write_flush_through_the_device(image):
    path, data = image
    dev = create({"path": str(path)})
    drv = BlkDriver.inline(dev)
    assert struct.unpack("<Q", dev.read_config(0, 8))[0] == NSECT
    assert drv.request(T_IN, 120, inlen=16 * SECTOR) == (S_OK, data[120 * 512:136 * 512])
    new = os.urandom(3 * SECTOR)
    assert drv.request(T_OUT, NSECT - 3, out=new) == (S_OK, b"")
    assert drv.request(T_FLUSH) == (S_OK, b"")
    assert path.read_bytes()[-3 * SECTOR:] == new            # on the file, not in a cache
    assert drv.request(T_IN, NSECT - 3, inlen=len(new)) == (S_OK, new)
    assert drv.request(T_GET_ID, inlen=20) == (S_OK, b"disk.raw".ljust(20, b"\0"))
    assert drv.request(T_IN, NSECT - 1, inlen=2 * SECTOR)[0] == S_IOERR   # past the end
    dev.close()


def test_large_reads_come_in_pieces(image):
    path, data = image
    dev = create({"path": str(path), "serial": "x"})
    drv = BlkDriver.inline(dev)
    assert drv.request(T_IN, 0, inlen=DISK) == (S_OK, data)   # more than one READ_PIECE
    dev.close()


def test_discard_and_write_zeroes_read_back_as_zeros(image):
    path, data = image
    dev = create({"path": str(path)})
    drv = BlkDriver.inline(dev)
    assert drv.request(T_DISCARD, out=struct.pack("<QII", 0, 128, 0))[0] == S_OK
    assert drv.request(T_WRITE_ZEROES, out=struct.pack("<QII", 1000, 3, 1))[0] == S_OK
    dev.close()
    got = path.read_bytes()
    want = bytearray(data)
    want[:128 * SECTOR] = bytes(128 * SECTOR)
    want[1000 * SECTOR:1003 * SECTOR] = bytes(3 * SECTOR)
    assert got == want and len(got) == DISK


def test_read_only_file_refuses_writes(image):
    path, data = image
    dev = create({"path": str(path), "readonly": "true"})
    assert dev.features & VIRTIO_BLK_F_RO
    drv = BlkDriver.inline(dev)
    assert drv.request(T_OUT, 0, out=b"x" * SECTOR)[0] == S_IOERR
    assert drv.request(T_IN, 0, inlen=SECTOR) == (S_OK, data[:SECTOR])
    dev.close()
    assert path.read_bytes() == data


def test_a_writer_locks_the_file_against_a_second_vm(image):
    path, _ = image
    params = {"path": str(path)}
    dev = create(params)
    with pytest.raises(StellarError, match="in use by another VM"):
        create(params)
    with pytest.raises(StellarError, match="in use by another VM"):
        create({**params, "readonly": "1"})
    dev.close()
    create(params).close()


@pytest.mark.parametrize("setup, params, error, match", [
    (None, {}, ConfigError, "path: missing required key"),
    (None, {"path": "/nonexistent/disk"}, DiskError, "No such file"),
    ("odd", {}, DiskError, "not a positive whole number of 512-byte sectors"),
    ("empty", {}, DiskError, "0 bytes"),
    ("dir", {"readonly": "1"}, DiskError, "not a regular file or block device"),
    ("ok", {"readonly": "perhaps"}, ConfigError, "true or false"),
    ("ok", {"volume": "x"}, ConfigError, "unknown key"),
])
def test_bad_params_get_clear_errors(tmp_path, setup, params, error, match):
    target = tmp_path / "t"
    if setup == "odd":
        target.write_bytes(b"x" * 1000)
    elif setup == "empty":
        target.write_bytes(b"")
    elif setup == "dir":
        target = tmp_path / "d"
        target.mkdir()
    elif setup == "ok":
        target.write_bytes(bytes(SECTOR))
    if setup:
        params = {"path": str(target), **params}
    with pytest.raises(error, match=match):
        create(params)


def test_snapshot_state_keeps_a_given_up_device_and_checks_the_disk_size(image, tmp_path):
    from stellarium_core.virtio import StateError

    dev = create({"path": str(image[0])})
    dev.broken = True
    saved = dev.save_state()
    dev.close()
    again = create({"path": str(image[0])})
    again.restore_state(saved)
    assert again.broken
    small = tmp_path / "small.raw"
    small.write_bytes(bytes(SECTOR))
    other = create({"path": str(small)})
    with pytest.raises(StateError, match=f"knew a disk of {NSECT} sectors, this one has 1"):
        other.restore_state(saved)
    assert not other.broken
    again.close()
    other.close()
