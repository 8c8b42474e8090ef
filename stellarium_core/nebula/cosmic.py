"""Cosmic Packs: many small files in one 64 KiB chunk, each still addressable.

NEBULA gives every chunk a 64-byte record in its pack, an index row and a log
record, and compresses it alone, so a 100-byte file stored as its own chunk costs
about 230 bytes and hardly compresses. A Cosmic Pack puts small files side by
side in one chunk with an inline index (compressed together); a file is then
named by (pack digest, slot) and is checked against its own hash when read.
Image layers pack files under 4 KiB in arrival order (:class:`Packer`);
``stellar ingest`` packs files under 16 KiB in groups that :func:`groups` cuts
where the paths say, so the same files in another tree make the same packs.

Layout (little-endian), at most 64 KiB::

    header, 64 bytes
      0  magic    8   b"COSMICPK"
      8  version  u32 1
     12  count    u32 number of index entries
     16  crc32    u32 CRC-32 of the index and data (bytes 64..end)
     20  reserved 44  zero
    index, count x 48 bytes
      0  hash     32  the file's own digest (the store's hasher)
     32  offset   u32 from the pack start
     36  length   u32
     40  flags    u32 0 (reserved)
     44  reserved u32 zero
    data          the files' bytes, back to back
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula.errors import ChunkError

MAGIC = b"COSMICPK"
VERSION = 1
PACK_SIZE = 64 * 1024
SMALL_FILE = 4096  # files strictly smaller than this are packed
#: A group ends after a file whose path hashes to 0 modulo this (when not full first).
GROUP_CUT = 16
HEADER = struct.Struct("<8sIII44x")
ENTRY = struct.Struct("<32sIIII")
assert HEADER.size == 64 and ENTRY.size == 48


class PackError(ChunkError):
    """A Cosmic Pack is damaged, or a slot does not match its hash."""


def encode(items: list[tuple[bytes, bytes]]) -> bytes:
    """A pack of ``(digest, data)`` items in slot order."""
    off = HEADER.size + ENTRY.size * len(items)
    index, data = bytearray(), bytearray()
    for digest, blob in items:
        index += ENTRY.pack(digest, off + len(data), len(blob), 0, 0)
        data += blob
    body = bytes(index + data)
    if HEADER.size + len(body) > PACK_SIZE:
        raise ValueError(f"{len(items)} items do not fit one {PACK_SIZE}-byte pack")
    return HEADER.pack(MAGIC, VERSION, len(items), zlib.crc32(body)) + body


def index(pack: bytes | memoryview) -> list[tuple[bytes, int, int]]:
    """The checked ``(digest, offset, length)`` rows of a pack."""
    if len(pack) < HEADER.size:
        raise PackError(f"Cosmic Pack is truncated ({len(pack)} bytes)")
    magic, version, count, crc = HEADER.unpack_from(pack)
    if magic != MAGIC or version != VERSION:
        raise PackError("not a version-1 Cosmic Pack")
    if HEADER.size + count * ENTRY.size > len(pack) or zlib.crc32(pack[HEADER.size:]) != crc:
        raise PackError("Cosmic Pack checksum mismatch (corrupt or truncated)")
    rows = []
    for i in range(count):
        digest, off, length, _flags, _ = ENTRY.unpack_from(pack, HEADER.size + i * ENTRY.size)
        if off + length > len(pack):
            raise PackError(f"Cosmic Pack slot {i} points past the pack end")
        rows.append((digest, off, length))
    return rows


def read_slot(pack: bytes | memoryview, slot: int, hasher: Hasher,
              expect: bytes | None = None) -> bytes:
    """The bytes in ``slot``, verified against the slot's hash (and ``expect`` if given)."""
    rows = index(pack)
    if not 0 <= slot < len(rows):
        raise PackError(f"Cosmic Pack has no slot {slot} ({len(rows)} slots)")
    digest, off, length = rows[slot]
    data = bytes(pack[off:off + length])
    if hasher.digest(data) != digest or (expect is not None and expect != digest):
        raise PackError(f"Cosmic Pack slot {slot} does not match its hash")
    return data


def pack_files(files: Sequence[tuple[str, int]], hasher: Hasher) -> bytes:
    """The pack of small files (path, size as listed), read whole, in order.

    ChunkError (a PackError) when one cannot be read or its size changed.
    """
    items = []
    for path, size in files:
        try:   # os-level calls: a rootfs has thousands of these, open() costs twice as much
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.read(fd, size + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PackError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) != size:
            raise PackError(f"{path} changed size while being stored ({size} bytes listed, "
                            f"{len(data)} read)")
        items.append((hasher.digest(data), data))
    return encode(items)


T = TypeVar("T")


def groups(files: Iterable[tuple[str, int, T]]) -> Iterator[list[tuple[str, int, T]]]:
    """``files`` (path, size, anything), in tree order, cut into groups that each
    fit one pack.

    A group holds files of one directory. It ends after a file whose path hashes
    to 0 modulo :data:`GROUP_CUT`, or where the next file would not fit. Cuts that
    depend on paths alone come back in step after an inserted, removed or changed
    file, so two trees that share most of their small files share most of their
    packs (as content-defined chunking does for bytes), and a directory added
    between two others changes neither's packs.
    """
    group: list[tuple[str, int, T]] = []
    used, where = HEADER.size, ""
    for item in files:
        path, size = item[0], item[1]
        here = path.rpartition("/")[0]
        if group and (here != where or used + ENTRY.size + size > PACK_SIZE):
            yield group
            group, used = [], HEADER.size
        group.append(item)
        used += ENTRY.size + size
        where = here
        if zlib.crc32(path.encode(errors="surrogateescape")) % GROUP_CUT == 0:
            yield group
            group, used = [], HEADER.size
    if group:
        yield group


@dataclass
class PackSlot:
    """Where a small file went; ``pack`` is filled in when its pack is sealed."""

    slot: int
    pack: bytes = b""


@dataclass
class Packer:
    """Fills packs in arrival order; identical files share one slot."""

    store: Any
    hasher: Hasher
    packs: list[bytes] = field(default_factory=list)
    _items: list[tuple[bytes, bytes]] = field(default_factory=list)
    _open: list[PackSlot] = field(default_factory=list)
    _seen: dict[bytes, PackSlot] = field(default_factory=dict)
    _used: int = HEADER.size

    def add(self, data: bytes) -> tuple[bytes, PackSlot]:
        """Place ``data`` (< 4 KiB); returns its digest and its (pending) slot."""
        digest = self.hasher.digest(data)
        hit = self._seen.get(digest)
        if hit is not None:
            return digest, hit
        need = ENTRY.size + len(data)
        if self._used + need > PACK_SIZE:
            self.seal()
        ps = PackSlot(len(self._items))
        self._items.append((digest, data))
        self._open.append(ps)
        self._seen[digest] = ps
        self._used += need
        return digest, ps

    def seal(self) -> None:
        """Store the open pack in NEBULA and name its slots."""
        if not self._items:
            return
        digest = self.store.put(encode(self._items))
        for ps in self._open:
            ps.pack = digest
        self.packs.append(digest)
        self._items, self._open, self._used = [], [], HEADER.size
