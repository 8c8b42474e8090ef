"""NEBULA's on-disk records: chunk records in packs, index log records, snapshot and
log headers, and the store metadata file. Everything that fixes a byte layout lives
here, so the modules that read and write the files agree by construction.

Layout of a store directory (``<store>/nebula``), format 2:

- ``packs/pack-NNNNNN.dat``: append-only. A chunk starts at a 64-byte-aligned offset
  and is followed by its 64-byte record (magic, digest, offset, lengths, flags, the
  name of its compressor, crc), so a pack can be re-indexed from its own bytes if
  the index is lost. A *mappable* chunk (flag ``MAPPABLE``) starts at a page
  boundary, is raw, and is followed by zeros to the end of its last page; its
  record comes after the last chunk of the same write, so no record is ever inside
  a mapping. Records name their chunk's offset, so a scan needs no other
  placement rule.
- ``index.log``: a 16-byte header and fixed 64-byte records (PUT location / REF delta /
  DEL), each with a crc32 and, for PUT, the compressor's name. Replaying it gives the
  index; a torn tail record (crash while appending) fails its crc and is ignored.
- ``index.snap``: the in-memory table as is (48-byte records + hash slots, crc'd in
  blocks; the header names the compressors of the records' codec slots), written
  via tmp + rename when the log passes 64 MiB and by ``gc``; the log then restarts
  empty with the snapshot's generation. Opening = load snapshot + replay.
- ``lock``: ``flock``-ed around every change, so processes can share a store.
- ``users``: ``flock``-ed shared by every open store, exclusive by a reference
  recount (``fsck --repair``), which must not race an operation elsewhere.
- ``pending/``, ``ingests/``: reference journals of unfinished operations (gc
  releases those of dead processes) and the records of ingests (see
  :mod:`~stellarium_core.nebula.pending`).
- ``DAMAGED``: written when loading finds index entries lost; ``gc`` refuses to
  run until ``fsck --repair`` has rebuilt the index and recounted references.
- ``nebula.json``: ``{"format": 1, "hasher": NAME}``; chunk identities depend on it.

Format 1 (until NEBULA v2) placed every chunk at a 4 KiB boundary, followed by a
56-byte trailer without offset or compressor name (lz4 was the only one), and
had 56-byte log records with page numbers. Stores of format 1 still open: their
log and snapshot are read and rewritten as format 2 by the first writer, and
their trailers are still found by ``fsck`` (see ``V1`` below).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

from stellarium_core.errors import UsageError
from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula.table import PAGE, UNIT

LOG_MAGIC = b"NEBLOG2\0"
LOG_HEADER = struct.Struct("<8sII")          # magic, digest size, generation
#: kind, flags, pack, offset, stored, raw, delta, compressor name, digest (+ crc32)
LOG_REC = struct.Struct("<BBHIIIi8s32s")
LOG_SIZE = LOG_REC.size + 4
LOG_FULL = struct.Struct(LOG_REC.format + "I")
PUT, REF, DEL = 1, 2, 3
SNAP_MAGIC = b"NEBSNAP2"
#: magic, generation, records, slots, compressor names of codec slots 1..7 (+ crc32)
SNAP_HEADER = struct.Struct("<8sQQQ56s")
SNAP_BLOCK = 4096                             # records per crc'd block
RECORD_PREFIX = b"NEBCHNK"                    # + format byte: the magic of chunk records
RECORD_MAGIC = RECORD_PREFIX + b"\x02"
#: magic, digest, offset, stored, raw, flags, compressor name (+ crc32)
CHUNK_RECORD = struct.Struct("<8s32sIIIB7s")
RECORD_SIZE = CHUNK_RECORD.size + 4
CODEC_BYTES = 7                               # a compressor's name, ASCII, in every record
META = "nebula.json"
PACK_RE = re.compile(r"pack-(\d{6})\.dat$")
assert LOG_SIZE == 64 and RECORD_SIZE == 64 and RECORD_SIZE % UNIT == 0


class V1:
    """Format-1 layouts, read when opening a store written before NEBULA v2."""

    LOG_MAGIC = b"NEBLOG1\0"
    LOG_REC = struct.Struct("<BBHIIIi32s")    # kind, flags, pack, page, stored, raw, delta, digest
    LOG_SIZE = LOG_REC.size + 4
    LOG_FULL = struct.Struct(LOG_REC.format + "I")
    SNAP_MAGIC = b"NEBSNAP1"
    SNAP_HEADER = struct.Struct("<8sQQQ")
    TRAILER_MAGIC = RECORD_PREFIX + b"\x01"
    TRAILER = struct.Struct("<8s32sIIB3x")    # magic, digest, stored, raw, flags (1: lz4)
    TRAILER_SIZE = TRAILER.size + 4
    CODEC = "lz4"


class ChunkRecord(NamedTuple):
    """What a pack says about one chunk it holds."""

    digest: bytes
    offset: int
    stored: int
    raw: int
    flags: int
    codec: str


def align(n: int, to: int = PAGE) -> int:
    """``n`` rounded up to a multiple of ``to`` (a power of two; a page by default)."""
    return (n + to - 1) & ~(to - 1)


def pack_name(n: int) -> str:
    return f"pack-{n:06d}.dat"


def codec_field(name: str, size: int = 8) -> bytes:
    """A compressor name as stored in records: ASCII, NUL-padded to ``size``."""
    raw = name.encode("ascii")
    if len(raw) > CODEC_BYTES:
        raise ValueError(f"compressor name {name!r} is longer than {CODEC_BYTES} bytes")
    return raw.ljust(size, b"\0")


def codec_name(field: bytes) -> str:
    """The name in a record's compressor field; raises ValueError when it is not one."""
    name = field.rstrip(b"\0")
    if b"\0" in name or not name.isascii() or not all(32 < c < 127 for c in name):
        raise ValueError(f"damaged compressor name {field!r}")
    return name.decode()


def log_record(kind: int, digest: bytes, pack: int = 0, offset: int = 0, stored: int = 0,
               raw: int = 0, delta: int = 0, flags: int = 0, codec: str = "") -> bytes:
    """One crc'd index log record (``offset`` in bytes, a multiple of 64)."""
    body = LOG_REC.pack(kind, flags, pack, offset, stored, raw, delta, codec_field(codec),
                        digest)
    return body + zlib.crc32(body).to_bytes(4, "little")


def chunk_record(r: ChunkRecord) -> bytes:
    body = CHUNK_RECORD.pack(RECORD_MAGIC, r.digest, r.offset, r.stored, r.raw, r.flags,
                             codec_field(r.codec, CODEC_BYTES))
    return body + zlib.crc32(body).to_bytes(4, "little")


def parse_record(buf: bytes | memoryview, at: int) -> ChunkRecord | None:
    """The chunk record (format 2) or trailer (format 1) starting at ``buf[at]``, if
    intact; a trailer's chunk is the bytes right before it."""
    head = bytes(buf[at:at + 8])
    if head == RECORD_MAGIC:
        body = bytes(buf[at:at + CHUNK_RECORD.size])
        if (len(body) < CHUNK_RECORD.size or zlib.crc32(body) !=
                int.from_bytes(buf[at + CHUNK_RECORD.size:at + RECORD_SIZE], "little")):
            return None
        _, digest, offset, stored, raw, flags, codec = CHUNK_RECORD.unpack(body)
        try:
            return ChunkRecord(digest, offset, stored, raw, flags, codec_name(codec))
        except ValueError:
            return None
    if head == V1.TRAILER_MAGIC:
        body = bytes(buf[at:at + V1.TRAILER.size])
        if (len(body) < V1.TRAILER.size or zlib.crc32(body) !=
                int.from_bytes(buf[at + V1.TRAILER.size:at + V1.TRAILER_SIZE], "little")):
            return None
        _, digest, stored, raw, flags = V1.TRAILER.unpack(body)
        return ChunkRecord(digest, at - stored, stored, raw, 0, V1.CODEC if flags & 1 else "")
    return None


def meta_problem(root: Path, hasher: Hasher) -> str | None:
    """What is wrong with ``nebula.json``, or None; a store of another hasher is a
    UsageError (its chunk identities cannot change)."""
    try:
        meta = json.loads((root / META).read_bytes())
    except FileNotFoundError:
        return "the store metadata is missing"
    except (OSError, ValueError, RecursionError) as exc:
        return f"unreadable store metadata: {exc}"
    if not isinstance(meta, dict) or not isinstance(meta.get("hasher"), str):
        return "damaged store metadata: expected {\"format\": 1, \"hasher\": NAME}"
    if meta["hasher"] != hasher.name:
        raise UsageError(f"store {root} holds chunks hashed with {meta['hasher']!r}, "
                         f"not {hasher.name!r}; chunk identities cannot change")
    return None


def write_meta(root: Path, hasher: Hasher) -> None:
    write_atomic(root / META, (json.dumps({"format": 1, "hasher": hasher.name})
                               + "\n").encode())
