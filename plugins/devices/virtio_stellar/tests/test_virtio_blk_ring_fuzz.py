"""The block device (C request loop and its Python fallback) under 10,000 hostile rings each,
over a raw file and over a Stellarium volume: nothing crashes or hangs, nothing outside
guest RAM is touched (guard pages), and the disk's size never changes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stellarium_virtio_stellar.device import (
    HEADER,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VirtioStellar,
)
from stellarium_virtio_stellar.disks import RawFileDisk

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes.blockdev import BlockDevice
from stellarium_core.volumes.volume import VolumeStore

DISK = 1 << 20
#: Buffers that often start with a well-formed request header, so requests get past the
#: header check and reach the disk (sectors around its end included).
HEADERS = st.builds(
    lambda t, sector, tail: HEADER.pack(t, 0, sector) + tail,
    st.sampled_from([T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 99]),
    st.one_of(st.integers(0, DISK // 512 + 8), st.integers(0, (1 << 64) - 1)),
    st.binary(max_size=48))
PAYLOADS = st.one_of(HEADERS, st.binary(max_size=128))


def _rig(dev: VirtioStellar) -> Rig:
    return Rig(dev, ram_size=4 << 20)


@pytest.fixture(scope="module")
def file_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Path]]:
    path = tmp_path_factory.mktemp("blkfuzz") / "disk.raw"
    path.write_bytes(os.urandom(DISK))
    rig = _rig(VirtioStellar(RawFileDisk(path)))
    yield rig, path
    rig.close()


@pytest.fixture(scope="module")
def volume_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Path]]:
    root = tmp_path_factory.mktemp("volfuzz")
    hasher = Blake3Hasher({})
    store = ChunkStore.open(root / "nebula", hasher, create=True)
    vol = VolumeStore(root / "volumes", store, hasher).create("v", DISK)
    vol.write(0, os.urandom(DISK))
    vol.flush()
    rig = _rig(VirtioStellar(BlockDevice(vol), on_close=vol.close))
    yield rig, root
    rig.close()
    store.close()


def _serve_hostile(rig: Rig, program: tuple) -> None:
    rig.restart()
    write_hostile(rig.rings[0], program)
    with time_limit(2.0):
        rig.kick(0)
        rig.kick(0)
    rig.ram.check_guards()


@fuzz_settings()
@given(program=fuzz_strategy(PAYLOADS))
def test_fuzz_random_rings_over_a_raw_file(file_rig, program):
    rig, path = file_rig
    _serve_hostile(rig, program)
    assert path.stat().st_size == DISK


@fuzz_settings()
@given(program=fuzz_strategy(PAYLOADS))
def test_fuzz_random_rings_over_a_volume(volume_rig, program):
    rig, _root = volume_rig
    _serve_hostile(rig, program)
    assert rig.dev.disk.sectors == DISK // 512
