"""NEBULA with several compressors: every chunk names its compressor in its records, a
store reads all it holds, and damaged or unknown compressor names and lying frames get
one clear error while nothing is lost."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
import zstandard

from stellarium_core.compression import Compressors
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import (
    ChunkStore,
    CorruptChunkError,
    MissingCompressorError,
)
from stellarium_core.nebula.format import (
    LOG_HEADER,
    LOG_REC,
    RECORD_PREFIX,
    parse_record,
)

HASHER = Blake3Hasher({})


def text(seed: int, n: int = 40_000) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"kernel", b"volume", b"chunk"]
    rnd = random.Random(seed)
    return b" ".join(rnd.choice(words) for _ in range(n // 6))[:n]


class ToyCompressor:
    """A compressor no installed plugin provides: for chunks made of two equal halves,
    the first half reversed."""

    name = "toy"
    params: dict[str, Any] = {}

    def compress(self, data: bytes | memoryview) -> bytes:
        return bytes(data)[: len(data) // 2][::-1]  # "saves" half: enough to be kept

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        half = bytes(data)[::-1]
        if 2 * len(half) != size:
            raise ValueError("toy: wrong size")
        return half * 2


class LyingZstd:
    """Writes zstd frames that declare another size than the chunk has."""

    name = "zstd"
    params: dict[str, Any] = {}

    def compress(self, data: bytes | memoryview) -> bytes:
        return zstandard.ZstdCompressor().compress(bytes(data)[: len(data) // 2])

    def decompress(self, data: bytes | memoryview, size: int) -> bytes:
        raise AssertionError("never used to read")


def test_a_store_reads_chunks_of_every_compressor_it_was_written_with(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    blobs = {name: text(i) for i, name in enumerate(("lz4", "zstd", "none"))}
    digests = {}
    for name, blob in blobs.items():
        with ChunkStore.open(root, HASHER, create=True, compression=name) as s:
            digests[name] = s.put(blob)
    with ChunkStore.open(root, HASHER) as s:
        for name, d in digests.items():
            assert s.entry(d).codec == ("" if name == "none" else name)
            assert s.get(d) == blobs[name] and bytes(s.view(d)) == blobs[name]
        assert s.stats()["chunks_by_compressor"] == {"lz4": 1, "none": 1, "zstd": 1}
        assert s.entry(digests["zstd"]).stored < s.entry(digests["lz4"]).stored
        with s.lock():
            s.compact_index()   # codec names now come from the snapshot's header
        s.release(digests["none"])
        assert s.gc()["chunks_removed"] == 1   # and the others were moved by the rewrite
        assert s.fsck().ok
    with ChunkStore.open(root, HASHER) as s:
        assert [s.entry(digests[n]).codec for n in ("lz4", "zstd")] == ["lz4", "zstd"]
        assert s.get(digests["zstd"]) == blobs["zstd"]


def test_unknown_compressor_is_one_clear_error_and_loses_nothing(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = b"ab" * 3000
    with ChunkStore.open(root, HASHER, create=True) as s:
        keep = s.put(text(1))
    with ChunkStore.open(root, HASHER, compression=ToyCompressor()) as s:
        d = s.put(data)
        assert s.entry(d).codec == "toy" and s.get(d) == data
    with ChunkStore.open(root, HASHER) as s:   # a host without the "toy" plugin
        with pytest.raises(MissingCompressorError, match="compressed with 'toy', which this "
                                                         "host cannot read: .*no compressor"):
            s.get(d)
        assert s.get(keep) == text(1)
        rep = s.fsck(repair=True)
        assert [p.chunk for p in rep.errors] == [d.hex()]
        assert "'toy'" in rep.errors[0].what
        assert s.gc()["chunks_removed"] == 0 and s.refs(d) == 1
    toy = ToyCompressor()
    with ChunkStore.open(root, HASHER, compressors=Compressors(toy)) as s:  # plugin back
        assert s.get(d) == data and s.fsck().ok


def test_damaged_compressor_name_in_the_log_is_repaired_from_the_pack(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = text(2)
    with ChunkStore.open(root, HASHER, create=True, compression="zstd") as s:
        d = s.put(data)
        s.put(b"a later record, so the damaged one is not a torn tail" * 10)
    codec_at = LOG_HEADER.size + LOG_REC.size - 32 - 8   # the first PUT record's name field
    with open(root / "index.log", "r+b") as fh:
        fh.seek(codec_at)
        assert fh.read(4) == b"zstd"
        fh.seek(codec_at)
        fh.write(b"zstX")
    with ChunkStore.open(root, HASHER) as s:
        assert not s.contains(d)
        assert any("fails its checksum" in what for _, _, what in s.log_damage)
        assert s.fsck(repair=True).repaired == 1
        assert s.get(d) == data and s.entry(d).codec == "zstd"
    assert os.path.getsize(root / "index.log") == LOG_HEADER.size  # compacted afresh
    with ChunkStore.open(root, HASHER) as s:
        assert s.fsck().ok


def test_damaged_compressor_name_in_a_pack_record_gets_a_fresh_copy(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = text(3)
    with ChunkStore.open(root, HASHER, create=True, compression="zstd") as s:
        d = s.put(data)
        e = s.entry(d)
        pack = s.pack_path(e.pack)
    at = e.offset + e.stored
    raw = bytearray(pack.read_bytes())
    assert parse_record(raw, at).codec == "zstd"
    raw[at + 8 + 32 + 12 + 1] ^= 0x20            # "zstd" -> "Zstd"
    pack.write_bytes(raw)
    with ChunkStore.open(root, HASHER) as s:
        assert s.get(d) == data                  # the index still knows how to read it
        rep = s.fsck()
        assert not rep.ok and "record is damaged; its content is intact" in rep.errors[0].what
        assert s.fsck(repair=True).repaired == 1
        assert s.get(d) == data and s.entry(d).offset != e.offset
        assert s.fsck().ok


def test_a_zstd_frame_that_lies_about_its_size_is_one_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "nebula"
    data = text(4)
    with ChunkStore.open(root, HASHER, create=True, compression=LyingZstd()) as s:
        bad = s.put(data)
    with ChunkStore.open(root, HASHER, create=True, compression="zstd") as s:
        good = s.put(text(5))
    with ChunkStore.open(root, HASHER) as s:
        with pytest.raises(CorruptChunkError, match=f"chunk {bad.hex()} is corrupt: its zstd "
                                                    f"bytes .* do not decompress to its "
                                                    f"{len(data)} bytes .*declares"):
            s.get(bad)
        assert s.get(good) == text(5)
        rep = s.fsck()
        assert [p.chunk for p in rep.errors] == [bad.hex()]


def test_format_1_store_is_read_upgraded_and_reindexed(tmp_path: Path) -> None:
    """A store written before NEBULA v2 (4 KiB-aligned chunks, 56-byte trailers, lz4 flag,
    page numbers in the log) opens, reads, takes writes, and fsck --repair re-indexes it."""
    root = tmp_path / "nebula"
    ChunkStore.open(root, HASHER, create=True).close()
    plain, packed = os.urandom(5000), text(6)
    _write_v1(root, [plain, packed])
    with ChunkStore.open(root, HASHER) as s:
        dp, dz = HASHER.digest(plain), HASHER.digest(packed)
        assert s.get(dp) == plain and s.get(dz) == packed and s.entry(dz).codec == "lz4"
        assert s.fsck().ok
        new = s.put(b"written after the upgrade" * 100)
    with open(root / "index.log", "rb") as fh:
        assert fh.read(8) == b"NEBLOG2\0"
    os.unlink(root / "index.snap")
    os.unlink(root / "index.log")
    with ChunkStore.open(root, HASHER) as s:
        assert len(s) == 0
        assert s.fsck(repair=True).repaired == 3
        assert {s.get(d) for d in (dp, dz)} == {plain, packed} and s.contains(new)


def _write_v1(root: Path, blobs: list[bytes]) -> None:
    """A format-1 pack and log holding ``blobs`` (the second one lz4-compressed)."""
    import struct
    import zlib

    import lz4.block

    pack, log = bytearray(), bytearray(b"NEBLOG1\0" + struct.pack("<II", 32, 0))
    for i, blob in enumerate(blobs):
        stored, flags = (lz4.block.compress(blob, store_size=False), 1) if i else (blob, 0)
        d, off = HASHER.digest(blob), len(pack)
        body = struct.pack("<8s32sIIB3x", b"NEBCHNK\x01", d, len(stored), len(blob), flags)
        pack += stored + body + zlib.crc32(body).to_bytes(4, "little")
        pack += bytes(-len(pack) % 4096)
        rec = struct.pack("<BBHIIIi32s", 1, flags, 1, off // 4096, len(stored), len(blob), 1, d)
        log += rec + zlib.crc32(rec).to_bytes(4, "little")
    (root / "packs" / "pack-000001.dat").write_bytes(pack)
    (root / "index.log").write_bytes(log)
    assert pack.count(RECORD_PREFIX) == 2
