"""Guest RAM as snapshot chunks, and back as copy-on-write mappings of them.

RAM is cut on a fixed 64 KiB grid of its flat layout (region after region, as in
the memfd). In each cell, every run of non-zero pages becomes one *mappable*
NEBULA chunk (raw and page-aligned in its pack), so:

- zero pages are never stored (never-touched memfd pages are holes, skipped with
  ``SEEK_DATA`` without being read);
- a cell that did not change has the same digest in every snapshot of every VM,
  so NEBULA stores it once;
- a restore maps each chunk straight from its pack, MAP_PRIVATE
  (:func:`stellarium_core.nebula.compose.compose`): only pages the guest touches
  fault in, from the host page cache that every clone of the snapshot shares, and
  its writes stay private.

A Diff re-reads only the cells its ``dirty`` test names and keeps the parent's
chunks for the rest; what decides "dirty" is the caller's (the KVM dirty log).
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from stellarium_core.virtio.memory import MemoryRegion, RegionMemory

PAGE = mmap.PAGESIZE
CELL = 64 << 10
_ZERO = bytes(PAGE)


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of RAM at flat ``offset``, stored as chunk ``digest``."""

    offset: int
    length: int
    digest: bytes


def flat_regions(mem: RegionMemory) -> Iterator[tuple[int, MemoryRegion]]:
    """(flat offset, region): the regions laid end to end, as the memfd holds them."""
    flat = 0
    for r in mem.regions:
        yield flat, r
        flat += r.size


def _extents(r: MemoryRegion) -> Iterator[tuple[int, int]]:
    """[start, end) ranges of ``r`` (region offsets) that may hold data: a memfd's
    non-hole ranges, or all of it when nothing says."""
    if not r.shareable:
        yield 0, r.size
        return
    pos, end = r.fd_offset, r.fd_offset + r.size
    while pos < end:
        try:
            start = os.lseek(r.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            raise
        if start >= end:
            return
        stop = min(os.lseek(r.fd, start, os.SEEK_HOLE), end)
        yield start - r.fd_offset, stop - r.fd_offset
        pos = stop


def _runs(view: memoryview, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """[start, end) runs of non-zero pages of ``view[lo:hi]``."""
    start = None
    for p in range(lo, hi, PAGE):
        if bytes(view[p:p + PAGE]) == _ZERO:   # a copy, then memcmp: 10x a view compare
            if start is not None:
                yield start, p
                start = None
        elif start is None:
            start = p
    if start is not None:
        yield start, hi


def save(mem: RegionMemory, put: Callable[[memoryview], bytes], *,
         parent: Sequence[Piece] = (), dirty: Callable[[int], bool] | None = None,
         kept: list[Piece] | None = None) -> list[Piece]:
    """``mem`` as pieces, sorted by offset, each piece's bytes given to ``put`` (which
    returns its digest: a batch's mappable put, or a migration's hash-and-offer). With
    ``dirty`` (a flat cell offset -> re-read it?), cells it declines keep their pieces
    from ``parent``; those are not put again, but added to ``kept``."""
    old: dict[int, list[Piece]] = {}
    for p in parent:
        old.setdefault(p.offset - p.offset % CELL, []).append(p)
    out: list[Piece] = []
    for flat, r in flat_regions(mem):
        view = mem.view(r.guest_addr, r.size)
        spans: dict[int, list[tuple[int, int]]] = {}     # flat cell -> its data ranges
        for lo, hi in _extents(r):
            a, b = flat + lo, flat + hi
            for cell in range(a - a % CELL, b, CELL):
                spans.setdefault(cell, []).append((max(a, cell), min(b, cell + CELL)))
        cells = set(spans)
        if dirty is not None:    # a parent's cell may be a hole now (the balloon freed it)
            cells.update(c for c in old if flat <= c < flat + r.size)
        for cell in sorted(cells):
            if dirty is not None and not dirty(cell):
                out.extend(old.get(cell, ()))
                if kept is not None:
                    kept.extend(old.get(cell, ()))
                continue
            for a, b in spans.get(cell, ()):
                for s, e in _runs(view, a - flat, b - flat):
                    out.append(Piece(flat + s, e - s, put(view[s:e])))
    return sorted(out, key=lambda p: p.offset)


def check(pieces: Sequence[Piece], size: int) -> str | None:
    """What makes ``pieces`` unusable as RAM of ``size`` bytes, or None."""
    end = 0
    for p in pieces:
        if p.offset % PAGE or p.length <= 0 or p.length % PAGE or p.length > CELL:
            return (f"piece at {p.offset}: offsets and lengths must be whole pages, "
                    f"at most {CELL} bytes")
        if p.offset < end or p.offset // CELL != (p.offset + p.length - 1) // CELL:
            return f"piece at {p.offset}: pieces must be sorted, apart, and inside one cell"
        end = p.offset + p.length
    if end > size:
        return f"a piece ends at {end}, past the {size} bytes of guest memory"
    return None
