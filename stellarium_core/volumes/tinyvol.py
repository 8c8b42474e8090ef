"""The TinyVol on-disk format: a volume is a manifest, not preallocated space.

Layout (all integers little-endian)::

    header, 64 bytes
      0  magic        8   b"TINYVOL\\0"
      8  version      u32 1
     12  flags        u32 bits 0-7: log2 of the chunk grid (12..16, 16 = 64 KiB)
                          bit 8: read-only (a snapshot or ShareVol)
     16  base         32  digest of the base (ShareVol) manifest; all zero = no base
     48  size         u64 volume size in bytes
     56  count        u32 number of ChunkRef entries that follow
     60  crc32        u32 CRC-32 of header bytes 0..59 followed by every entry byte

    count ChunkRef entries, 48 bytes each, sorted by offset, one per grid slot
      0  hash         32  chunk digest (all zero for a ZERO entry)
     32  offset       u48 byte offset of the chunk in the volume (grid aligned)
     38  len_minus_1  u16 chunk length - 1 (a 64 KiB chunk does not fit a u16 otherwise)
     40  flags        u64 bit 0: ZERO, the slot reads as zeros and masks the base

An empty volume of any size is therefore exactly 64 bytes, and each chunk that
differs from the base costs 48 bytes. The file length must be 64 + 48 * count
(truncation) and the CRC must match (corruption); both fail with
:class:`ManifestError` before anything is used.

Version 2 is an *extent map*: a read-only disk composed of byte ranges of chunks
that were stored for something else (an image's file data, a Cosmic Pack slot),
so the disk adds no data of its own. Same 64-byte header and CRC; the flags must
say read-only and carry the disk's block size (log2), ``base`` is the digest of
the image manifest the disk was built from, and each 48-byte entry is::

      0  hash          32  chunk digest
     32  offset        u48 byte offset of the extent in the disk
     38  chunk_offset  u32 where the extent starts inside the chunk
     42  length        u32 extent length in bytes
     46  flags         u16 0 (reserved)

Entries are sorted by offset and never overlap; bytes no extent covers read as
zeros (so a file's last block needs no padding chunk).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from stellarium_core.errors import StellarError

MAGIC = b"TINYVOL\0"
VERSION = 1
VERSION_EXTENTS = 2
HEADER = struct.Struct("<8sII32sQII")
HEADER_SIZE = HEADER.size  # 64
ENTRY_SIZE = 48
NO_BASE = bytes(32)
DEFAULT_SHIFT = 16

FLAG_READONLY = 1 << 8
_SHIFT_MASK = 0xFF
_KNOWN_HEADER_FLAGS = _SHIFT_MASK | FLAG_READONLY

REF_ZERO = 1
_KNOWN_REF_FLAGS = REF_ZERO
_MAX_OFFSET = (1 << 48) - 1
_EXTENT_TAIL = struct.Struct("<IIH")

assert HEADER_SIZE == 64


class ManifestError(StellarError):
    """A volume manifest is truncated, corrupt, or of an unknown version."""


@dataclass(frozen=True)
class ChunkRef:
    """One grid slot that differs from the base: its chunk, or ZERO."""

    digest: bytes
    length: int
    flags: int = 0

    @property
    def zero(self) -> bool:
        return bool(self.flags & REF_ZERO)


@dataclass
class TinyVol:
    """A decoded manifest: header fields plus the slot index -> ChunkRef map."""

    size: int
    shift: int = DEFAULT_SHIFT
    base: bytes = NO_BASE
    readonly: bool = False
    refs: dict[int, ChunkRef] = field(default_factory=dict)

    @property
    def chunk_size(self) -> int:
        return 1 << self.shift

    @property
    def slots(self) -> int:
        """Number of grid slots (the last may be shorter than the grid)."""
        return -(-self.size // self.chunk_size)

    def slot_len(self, idx: int) -> int:
        return min(self.chunk_size, self.size - idx * self.chunk_size)

    def encode(self) -> bytes:
        return encode(self)


def _check_geometry(size: int, shift: int) -> None:
    if not 12 <= shift <= 16:
        raise ManifestError(f"chunk grid 2^{shift} is outside 4 KiB..64 KiB")
    if size < 0 or size > _MAX_OFFSET:
        raise ManifestError(f"volume size {size} is outside 0..2^48-1 bytes")


def encode(vol: TinyVol) -> bytes:
    """Serialise ``vol``; entries are written in slot order."""
    _check_geometry(vol.size, vol.shift)
    if len(vol.base) != 32:
        raise ManifestError("base digest must be 32 bytes")
    body = bytearray()
    for idx in sorted(vol.refs):
        ref = vol.refs[idx]
        off = idx << vol.shift
        if off >= vol.size or not 1 <= ref.length <= vol.slot_len(idx):
            raise ManifestError(f"chunk slot {idx} (length {ref.length}) lies outside the volume")
        body += ref.digest
        body += off.to_bytes(6, "little")
        body += struct.pack("<HQ", ref.length - 1, ref.flags)
    flags = vol.shift | (FLAG_READONLY if vol.readonly else 0)
    head = HEADER.pack(MAGIC, VERSION, flags, vol.base, vol.size, len(vol.refs), 0)[:60]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + bytes(body)


def _header(data: bytes, version: int) -> tuple[int, bytes, int, int]:
    """(flags, base, size, count) from the 64-byte header of a ``version`` manifest
    (magic, version, flags and geometry checked; not the length or CRC)."""
    if len(data) < HEADER_SIZE:
        raise ManifestError(f"manifest is truncated: {len(data)} bytes, header needs 64")
    magic, got, flags, base, size, count, _crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ManifestError("not a TinyVol manifest (bad magic)")
    if got != version:
        what = {VERSION: "a grid volume", VERSION_EXTENTS: "an image disk (extent map)"}
        raise ManifestError(f"TinyVol version {got} ({what.get(got, 'unknown')}) where "
                            f"version {version} ({what[version]}) was expected")
    if flags & ~_KNOWN_HEADER_FLAGS:
        raise ManifestError(f"unknown TinyVol header flags {flags:#x}")
    _check_geometry(size, flags & _SHIFT_MASK)
    return flags, base, size, count


def _check_body(data: bytes, count: int) -> None:
    """The file holds exactly ``count`` entries and its CRC matches."""
    want = HEADER_SIZE + count * ENTRY_SIZE
    if len(data) != want:
        raise ManifestError(
            f"manifest is {'truncated' if len(data) < want else 'too long'}: "
            f"{len(data)} bytes, header says {count} entries ({want} bytes)")
    crc = struct.unpack_from("<I", data, 60)[0]
    if zlib.crc32(data[HEADER_SIZE:], zlib.crc32(data[:60])) != crc:
        raise ManifestError("manifest checksum mismatch (corrupt)")


def decode_header(data: bytes) -> TinyVol:
    """Decode only the 64-byte header (no entries, CRC unchecked): cheap catalog scans."""
    flags, base, size, _ = _header(data, VERSION)
    return TinyVol(size=size, shift=flags & _SHIFT_MASK, base=base,
                   readonly=bool(flags & FLAG_READONLY))


def decode(data: bytes) -> TinyVol:
    """Parse and verify a whole manifest; raise :class:`ManifestError` on any damage."""
    vol = decode_header(data)
    count = struct.unpack_from("<I", data, 56)[0]
    _check_body(data, count)
    mv = memoryview(data)
    prev = -1
    for pos in range(HEADER_SIZE, HEADER_SIZE + count * ENTRY_SIZE, ENTRY_SIZE):
        digest = bytes(mv[pos:pos + 32])
        off = int.from_bytes(mv[pos + 32:pos + 38], "little")
        len_m1, rflags = struct.unpack_from("<HQ", mv, pos + 38)
        if rflags & ~_KNOWN_REF_FLAGS:
            raise ManifestError(f"unknown ChunkRef flags {rflags:#x} at offset {off}")
        idx = off >> vol.shift
        if off & (vol.chunk_size - 1) or off >= vol.size or idx <= prev:
            raise ManifestError(f"ChunkRef offset {off} is unaligned, out of order or past the end")
        if len_m1 + 1 > vol.slot_len(idx):
            raise ManifestError(f"ChunkRef at offset {off} is longer than its slot")
        vol.refs[idx] = ChunkRef(digest, len_m1 + 1, rflags)
        prev = idx
    return vol


# -- version 2: extent maps -------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """Disk bytes ``offset .. offset+length`` are chunk bytes ``chunk_offset ..``."""

    offset: int
    digest: bytes
    chunk_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class ExtentMap:
    """A decoded version-2 manifest: a read-only disk made of chunk byte ranges."""

    size: int
    image: bytes
    extents: list[Extent] = field(default_factory=list)
    shift: int = 12

    def encode(self) -> bytes:
        return encode_extents(self)

    def digests(self) -> set[bytes]:
        """The distinct chunks the disk reads from."""
        return {x.digest for x in self.extents}


def encode_extents(disk: ExtentMap) -> bytes:
    """Serialise ``disk``; extents must already be sorted and disjoint."""
    _check_geometry(disk.size, disk.shift)
    if len(disk.image) != 32:
        raise ManifestError("image digest must be 32 bytes")
    body = bytearray()
    end = 0
    for x in disk.extents:
        if x.offset < end or x.end > disk.size or x.length < 1 or len(x.digest) != 32:
            raise ManifestError(f"extent at {x.offset} (length {x.length}) overlaps its "
                                "predecessor or lies outside the disk")
        if x.chunk_offset + x.length > 0xFFFFFFFF:
            raise ManifestError(f"extent at {x.offset} reaches past 4 GiB into its chunk")
        body += x.digest
        body += x.offset.to_bytes(6, "little")
        body += _EXTENT_TAIL.pack(x.chunk_offset, x.length, 0)
        end = x.end
    flags = disk.shift | FLAG_READONLY
    head = HEADER.pack(MAGIC, VERSION_EXTENTS, flags, disk.image, disk.size,
                       len(disk.extents), 0)[:60]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + bytes(body)


def decode_extents(data: bytes) -> ExtentMap:
    """Parse and verify a version-2 manifest; raise :class:`ManifestError` on any damage."""
    flags, image, size, count = _header(data, VERSION_EXTENTS)
    _check_body(data, count)
    if not flags & FLAG_READONLY:
        raise ManifestError("an image disk manifest must be read-only")
    disk = ExtentMap(size=size, image=image, shift=flags & _SHIFT_MASK)
    mv = memoryview(data)
    end = 0
    for pos in range(HEADER_SIZE, HEADER_SIZE + count * ENTRY_SIZE, ENTRY_SIZE):
        off = int.from_bytes(mv[pos + 32:pos + 38], "little")
        chunk_off, length, xflags = _EXTENT_TAIL.unpack_from(mv, pos + 38)
        if xflags:
            raise ManifestError(f"unknown extent flags {xflags:#x} at offset {off}")
        if off < end or length < 1 or off + length > size:
            raise ManifestError(f"extent at offset {off} (length {length}) is out of order, "
                                "empty or past the end of the disk")
        disk.extents.append(Extent(off, bytes(mv[pos:pos + 32]), chunk_off, length))
        end = off + length
    return disk


def merged(base: Mapping[int, ChunkRef], delta: Mapping[int, ChunkRef]) -> dict[int, ChunkRef]:
    """The flat slot map of ``delta`` over ``base``: ZERO entries drop out."""
    out = dict(base)
    for idx, ref in delta.items():
        if ref.zero:
            out.pop(idx, None)
        else:
            out[idx] = ref
    return out
