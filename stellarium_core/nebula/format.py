"""NEBULA's on-disk records: pack trailers, index log records, snapshot and log headers,
and the store metadata file. Everything that fixes a byte layout lives here, so the
modules that read and write the files agree by construction.

Layout of a store directory (``<store>/nebula``):

- ``packs/pack-NNNNNN.dat``: append-only. Each chunk's bytes start at a 4 KiB-aligned
  offset and are followed by a 56-byte trailer (magic, digest, lengths, flags, crc), so
  a pack can be re-indexed from its own bytes if the index is lost.
- ``index.log``: a 16-byte header and fixed 56-byte records (PUT location / REF delta /
  DEL), each with a crc32. Replaying it gives the index; a torn tail record (crash while
  appending) fails its crc and is ignored.
- ``index.snap``: the in-memory table as is (48-byte records + hash slots, crc'd in
  blocks), written via tmp + rename when the log passes 64 MiB and by ``gc``; the log
  then restarts empty with the snapshot's generation. Opening = load snapshot + replay.
- ``lock``: ``flock``-ed around every change, so processes can share a store.
- ``users``: ``flock``-ed shared by every open store, exclusive by a reference
  recount (``fsck --repair``), which must not race an operation elsewhere.
- ``pending/``, ``ingests/``: reference journals of unfinished operations (gc
  releases those of dead processes) and the records of ingests (see
  :mod:`~stellarium_core.nebula.pending`).
- ``DAMAGED``: written when loading finds index entries lost; ``gc`` refuses to
  run until ``fsck --repair`` has rebuilt the index and recounted references.
- ``nebula.json``: ``{"format": 1, "hasher": NAME}``; chunk identities depend on it.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

from stellarium_core.errors import UsageError
from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula.table import PAGE

LOG_MAGIC = b"NEBLOG1\0"
LOG_HEADER = struct.Struct("<8sII")          # magic, digest size, generation
SNAP_MAGIC = b"NEBSNAP1"
SNAP_HEADER = struct.Struct("<8sQQQ")         # magic, generation, records, slots (+ crc32)
SNAP_BLOCK = 4096                             # records per crc'd block
LOG_REC = struct.Struct("<BBHIIIi32s")        # kind, flags, pack, page, stored, raw, delta, digest
LOG_SIZE = LOG_REC.size + 4                   # + crc32
LOG_FULL = struct.Struct(LOG_REC.format + "I")
PUT, REF, DEL = 1, 2, 3
TRAILER_MAGIC = b"NEBCHNK\x01"
TRAILER = struct.Struct("<8s32sIIB3x")        # magic, digest, stored, raw, flags
TRAILER_SIZE = TRAILER.size + 4               # + crc32
META = "nebula.json"
PACK_RE = re.compile(r"pack-(\d{6})\.dat$")


def align(n: int) -> int:
    """``n`` rounded up to the page size: where the next chunk in a pack may start."""
    return (n + PAGE - 1) & ~(PAGE - 1)


def pack_name(n: int) -> str:
    return f"pack-{n:06d}.dat"


def log_record(kind: int, digest: bytes, pack: int = 0, offset: int = 0, stored: int = 0,
               raw: int = 0, delta: int = 0, flags: int = 0) -> bytes:
    """One crc'd index log record (``offset`` in bytes, page-aligned)."""
    body = LOG_REC.pack(kind, flags, pack, offset // PAGE, stored, raw, delta, digest)
    return body + zlib.crc32(body).to_bytes(4, "little")


def trailer(digest: bytes, stored: int, raw: int, flags: int) -> bytes:
    body = TRAILER.pack(TRAILER_MAGIC, digest, stored, raw, flags)
    return body + zlib.crc32(body).to_bytes(4, "little")


def parse_trailer(buf: bytes | memoryview) -> tuple[bytes, int, int, int] | None:
    """(digest, stored, raw, flags) of a valid trailer, else None."""
    if len(buf) < TRAILER_SIZE:
        return None
    body = bytes(buf[:TRAILER.size])
    if zlib.crc32(body) != int.from_bytes(buf[TRAILER.size:TRAILER_SIZE], "little"):
        return None
    magic, digest, stored, raw, flags = TRAILER.unpack(body)
    return (digest, stored, raw, flags) if magic == TRAILER_MAGIC else None


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
