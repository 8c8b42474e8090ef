"""The in-memory chunk index: one 48-byte record per chunk plus a 4-byte hash slot.

A ``dict[bytes, tuple]`` costs about 200 bytes per chunk in CPython (key object,
tuple, int objects, dict entry). Here records live packed in one ``bytearray``
(digest + two 64-bit words) and an open-addressing ``array('I')`` of slots
points into it, so 1M chunks cost about 56 MiB instead of 200 MiB.

Record words: ``a = pack | unit << 16 | stored << 40`` and
``b = raw | refs << 24 | flags << 56``; lengths below 16 MiB, offsets in units of
64 bytes (so a 1 GiB pack is addressable). The low three flag bits name the
chunk's compressor by its slot in :attr:`ChunkTable.codecs` (0: stored raw); a
store meets few compressors, and records on disk carry the names.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator
from typing import NamedTuple

RECORD = 48
PAGE = 4096
#: Chunks start at multiples of this in their pack (the table keeps offset // UNIT).
UNIT = 64
_REC = struct.Struct("<32sQQ")
_WORDS = struct.Struct("<QQ")
_M24 = (1 << 24) - 1
_M32 = (1 << 32) - 1

#: Flag bits. The codec slot is the table's; the others are persisted (in index
#: log and pack records); DEAD exists only in memory.
CODEC_MASK = 0x07
#: Stored raw at a page boundary, zeros to the end of its last page, its record
#: elsewhere: its bytes can be mmapped straight from the pack.
MAPPABLE = 0x08
TIER_SHIFT = 4
DEAD = 0x80
MAX_LEN = _M24
MAX_REFS = _M32
MAX_CODECS = CODEC_MASK


class Entry(NamedTuple):
    """Where a chunk lives: pack number, byte offset, stored and raw length, refs,
    persisted flags, and the name of its compressor ("" when stored raw)."""

    pack: int
    offset: int
    stored: int
    raw: int
    refs: int
    flags: int
    codec: str = ""

    @property
    def compressed(self) -> bool:
        return bool(self.codec)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & MAPPABLE)

    @property
    def tier(self) -> int:
        return (self.flags >> TIER_SHIFT) & 0x3


class ChunkTable:
    """digest -> :class:`Entry`, compact; not thread-safe (the store serialises access)."""

    def __init__(self, codecs: list[str] | None = None) -> None:
        #: Compressor names by slot - 1 (slot 0, ""/raw, is implicit).
        self.codecs: list[str] = list(codecs or [])
        self._slot_of: dict[str, int] = {c: i + 1 for i, c in enumerate(self.codecs)}
        self._recs = bytearray()
        self._n = 0          # records, dead ones included
        self._live = 0
        self._mask = 1023
        self._slots = array("I", bytes(4 * (self._mask + 1)))

    def __len__(self) -> int:
        return self._live

    def nbytes(self) -> int:
        """Bytes held by the two buffers (what a chunk costs in memory)."""
        return len(self._recs) + len(self._slots) * self._slots.itemsize

    def _find(self, digest: bytes) -> tuple[int, int]:
        """(slot, record index) for ``digest``; record index -1 when absent."""
        mask, slots, recs = self._mask, self._slots, self._recs
        i = int.from_bytes(digest[:8], "little") & mask
        while True:
            r = slots[i]
            if r == 0:
                return i, -1
            o = (r - 1) * RECORD
            if recs[o:o + 32] == digest:
                return i, r - 1
            i = (i + 1) & mask

    def _words(self, r: int) -> tuple[int, int]:
        _, a, b = _REC.unpack_from(self._recs, r * RECORD)
        return a, b

    def slot(self, codec: str) -> int:
        """The flag bits that name ``codec`` (interned on first use)."""
        if not codec:
            return 0
        slot = self._slot_of.get(codec)
        if slot is None:
            if len(self.codecs) >= MAX_CODECS:
                raise ValueError(f"a store holds chunks of at most {MAX_CODECS} compressors; "
                                 f"{codec!r} would be one more than {', '.join(self.codecs)}")
            self.codecs.append(codec)
            slot = self._slot_of[codec] = len(self.codecs)
        return slot

    def _entry(self, a: int, b: int) -> Entry:
        flags = b >> 56
        slot = flags & CODEC_MASK
        return Entry(a & 0xFFFF, ((a >> 16) & _M24) * UNIT, a >> 40, b & _M24,
                     (b >> 24) & _M32, flags & ~CODEC_MASK, self.codecs[slot - 1] if slot else "")

    def get(self, digest: bytes) -> Entry | None:
        r = self._find(digest)[1]
        if r < 0:
            return None
        a, b = self._words(r)
        if (b >> 56) & DEAD:
            return None
        return self._entry(a, b)

    def __contains__(self, digest: bytes) -> bool:
        r = self._find(digest)[1]
        return r >= 0 and not self._recs[r * RECORD + 47] & DEAD

    def upsert(self, digest: bytes, pack: int, offset: int, stored: int, raw: int,
               delta: int, flags: int) -> None:
        """Place ``digest`` at (pack, offset) and add ``delta`` refs, in one probe;
        ``flags`` include the codec slot (:meth:`slot`).

        The index replay's hot path: a new chunk, or a known one that moved (gc).
        """
        unit = offset // UNIT
        if not (0 <= pack <= 0xFFFF and 0 <= unit <= _M24 and offset % UNIT == 0
                and stored <= _M24 and raw <= _M24):
            raise ValueError(f"location out of range: pack {pack} offset {offset} "
                             f"stored {stored} raw {raw}")
        a = pack | unit << 16 | stored << 40
        i, r = self._find(digest)
        if r >= 0:
            b = _WORDS.unpack_from(self._recs, r * RECORD + 32)[1]
            if b >> 56 & DEAD:
                self._live += 1
                refs = delta
            else:
                refs = ((b >> 24) & _M32) + delta
            b = raw | min(max(refs, 0), MAX_REFS) << 24 | (flags & 0x7F) << 56
            _REC.pack_into(self._recs, r * RECORD, digest, a, b)
            return
        b = raw | min(max(delta, 0), MAX_REFS) << 24 | (flags & 0x7F) << 56
        self._recs += _REC.pack(digest, a, b)
        self._slots[i] = self._n + 1
        self._n += 1
        self._live += 1
        if self._n * 3 > (self._mask + 1) * 2:
            self._rehash((self._mask + 1) * 2)

    def add_refs(self, digest: bytes, delta: int) -> int:
        """Add ``delta`` (may be negative) to the live chunk's refs; returns the new count."""
        r = self._find(digest)[1]
        if r < 0:
            raise KeyError(digest)
        a, b = self._words(r)
        if (b >> 56) & DEAD:
            raise KeyError(digest)
        refs = min(max(((b >> 24) & _M32) + delta, 0), MAX_REFS)
        b = (b & ~(_M32 << 24)) | refs << 24
        _WORDS.pack_into(self._recs, r * RECORD + 32, a, b)
        return refs

    def delete(self, digest: bytes) -> None:
        """Mark a chunk dead; its record is dropped at the next :meth:`compact`."""
        r = self._find(digest)[1]
        if r < 0:
            return
        a, b = self._words(r)
        if not (b >> 56) & DEAD:
            self._live -= 1
            _WORDS.pack_into(self._recs, r * RECORD + 32, a,
                             (b & ~(_M32 << 24)) | DEAD << 56)

    def items(self) -> Iterator[tuple[bytes, Entry]]:
        """Live chunks in insertion order."""
        recs = self._recs
        for r in range(self._n):
            d, a, b = _REC.unpack_from(recs, r * RECORD)
            if not (b >> 56) & DEAD:
                yield d, self._entry(a, b)

    def dump(self) -> tuple[bytes, bytes]:
        """(records, slots) exactly as held, dead records dropped, for a snapshot file."""
        if self._n != self._live:
            self.compact()
        return bytes(self._recs), self._slots.tobytes()

    @classmethod
    def load(cls, records: bytes | bytearray, slots: bytes | None,
             codecs: list[str]) -> ChunkTable:
        """A table from :meth:`dump` output and :attr:`codecs`; ``slots=None``
        rebuilds the hash slots (slower)."""
        t = cls(codecs)
        t._recs = bytearray(records)
        t._n = t._live = len(records) // RECORD
        if slots is not None:
            t._slots = array("I")
            t._slots.frombytes(slots)
            t._mask = len(t._slots) - 1
        else:
            size = 1024
            while t._n * 3 > size * 2:
                size *= 2
            t._rehash(size)
        return t

    def compact(self) -> None:
        """Drop dead records and rebuild the slots."""
        keep = bytearray()
        recs = self._recs
        for r in range(self._n):
            o = r * RECORD
            if not recs[o + 47] & DEAD:
                keep += recs[o:o + RECORD]
        self._recs, self._n = keep, len(keep) // RECORD
        self._live = self._n
        size = 1024
        while self._n * 3 > size * 2:
            size *= 2
        self._rehash(size)

    def _rehash(self, size: int) -> None:
        self._mask = mask = size - 1
        slots = self._slots = array("I", bytes(4 * size))
        recs = self._recs
        for r in range(self._n):
            o = r * RECORD
            i = int.from_bytes(recs[o:o + 8], "little") & mask
            while slots[i]:
                i = (i + 1) & mask
            slots[i] = r + 1
