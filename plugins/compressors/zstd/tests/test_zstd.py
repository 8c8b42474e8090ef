"""The zstd compressor plugin: found by name, round trips, refuses lying frames, and
works from several threads at once."""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import Compressor
from stellarium_core.plugins import Registry

TEXT = b"".join(b"line %d of a config file\n" % i for i in range(3000))


@pytest.fixture
def zstd() -> Compressor:
    return Registry().create("compressor", "zstd", {})


def test_round_trip_is_smaller_than_lz4(zstd: Compressor) -> None:
    lz4 = Registry().create("compressor", "lz4", {})
    assert isinstance(zstd, Compressor) and zstd.name == "zstd" and zstd.params == {"level": 3}
    packed = zstd.compress(TEXT)
    assert zstd.decompress(packed, len(TEXT)) == TEXT
    assert len(packed) < len(lz4.compress(TEXT))


def test_level_is_checked() -> None:
    with pytest.raises(ConfigError, match="level"):
        Registry().create("compressor", "zstd", {"level": 0})
    fast = Registry().create("compressor", "zstd", {"level": -5})
    assert fast.decompress(fast.compress(TEXT), len(TEXT)) == TEXT


def test_a_frame_that_lies_about_its_size_is_refused_before_allocating(zstd: Compressor) -> None:
    """A frame declaring another size than the chunk record is refused; one declaring
    1 TiB is refused at once, before the library allocates what it declares."""
    lying = zstandard.ZstdCompressor().compress(os.urandom(64))
    with pytest.raises(ValueError, match="declares 64 bytes, the chunk record 4096"):
        zstd.decompress(lying, 4096)
    t0 = time.monotonic()
    forged = _with_declared_size(zstandard.ZstdCompressor().compress(b"x" * 100), 1 << 40)
    assert zstandard.frame_content_size(forged) == 1 << 40
    with pytest.raises(ValueError, match=f"declares {1 << 40} bytes"):
        zstd.decompress(forged, 100)
    assert time.monotonic() - t0 < 5


def test_garbage_and_short_output_are_value_errors(zstd: Compressor) -> None:
    with pytest.raises(ValueError, match="not a zstd frame"):
        zstd.decompress(b"not zstd at all", 10)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(TEXT)
    assert zstd.decompress(no_size, len(TEXT)) == TEXT
    with pytest.raises(ValueError):   # more than the record allows
        zstd.decompress(no_size, 100)
    with pytest.raises(ValueError):   # a truncated frame
        zstd.decompress(zstd.compress(TEXT)[:-10], len(TEXT))


def test_threads_share_one_compressor(zstd: Compressor) -> None:
    blobs = [random.Random(i).randbytes(2000) * 20 for i in range(64)]
    with ThreadPoolExecutor(4) as ex:
        packed = list(ex.map(zstd.compress, blobs))
        back = list(ex.map(zstd.decompress, packed, [len(b) for b in blobs]))
    assert back == blobs


def _with_declared_size(frame: bytes, size: int) -> bytes:
    """``frame`` with its frame content size field rewritten as 8 bytes = ``size``."""
    descriptor = frame[4]
    fcs_flag, single = descriptor >> 6, (descriptor >> 5) & 1
    fcs_len = {0: single, 1: 2, 2: 4, 3: 8}[fcs_flag]
    start = 5 + (0 if single else 1) + (1 << (descriptor & 3)) // 2 * bool(descriptor & 3)
    new_descriptor = (descriptor & 0x3F) | 0xC0
    return (frame[:4] + bytes([new_descriptor]) + frame[5:start] + size.to_bytes(8, "little")
            + frame[start + fcs_len:])
