"""Composing an address range from mappable chunks (the DAX base and restored-memory
building block): the range reads as the chunks with zeros between, compressed chunks get
one mappable copy per store, processes composing the same chunks share their pages, and
bad layouts or damaged packs are ChunkErrors that leave nothing mapped or leased."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stellarium_core.nebula import ChunkError, ChunkStore, CorruptChunkError, MissingChunkError
from stellarium_core.nebula.compose import compose, materialise
from stellarium_core.nebula.table import PAGE

GRID = 64 << 10
TEXT = b"compressible text, the same words again and again. " * 1300


def _leases(store: ChunkStore) -> dict:
    return store._leases._held


def _range(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


@pytest.fixture
def grid(store: ChunkStore) -> dict[int, bytes]:
    """Slot -> bytes: a raw mappable chunk, a compressed one, a short last one; slot 2 empty."""
    rnd = random.Random(7)
    slots = {0: rnd.randbytes(GRID), 1: TEXT[:GRID], 3: rnd.randbytes(5000)}
    with store.batch() as b:
        b.put(slots[0], mappable=True)
        b.put(slots[1])
        b.put(slots[3])
    return slots


def _layout(store: ChunkStore, slots: dict[int, bytes]) -> list[tuple[int, bytes]]:
    return [(i * GRID, store.hasher.digest(data)) for i, data in sorted(slots.items())]


def test_a_composition_reads_as_its_chunks_with_zeros_between(store, grid) -> None:
    layout = _layout(store, grid)
    compressed = layout[1][1]
    assert store.entry(compressed).compressed
    refs = {d: store.entry(d).refs for _, d in layout}
    assert materialise(store, [d for _, d in layout]) == 2   # the compressed and the short
    assert materialise(store, [d for _, d in layout]) == 0   # once per store
    assert all(store.entry(d).mappable for _, d in layout)
    assert {d: store.entry(d).refs for _, d in layout} == refs  # the copy takes none
    size = 5 * GRID
    with compose(store, layout, size) as c:
        assert c.chunks == 3 and c.size == size
        want = bytearray(size)
        for i, data in grid.items():
            want[i * GRID:i * GRID + len(data)] = data
        assert _range(c.addr, size) == bytes(want)
        assert len(_leases(store)) >= 1
    assert c.addr == 0 and not _leases(store)


def test_chunks_that_follow_each_other_in_a_pack_are_one_mmap_and_one_lease(store) -> None:
    """A volume imported in order: 40 chunks in one pack, one mmap, one lease held."""
    rnd = random.Random(11)
    data = [rnd.randbytes(GRID) for _ in range(40)]
    with store.batch() as b:
        digests = [b.put(d, mappable=True) for d in data]
    layout = [(i * GRID, d) for i, d in enumerate(digests)]
    del layout[20]                                # a hole: the run is cut in two
    with compose(store, layout, 40 * GRID) as c:
        assert (c.chunks, c.maps) == (39, 2)
        assert len(_leases(store)) == 1 and len(c._leases) == 1
        assert _range(c.addr, 40 * GRID) == b"".join(data[:20]) + bytes(GRID) \
            + b"".join(data[21:])
        maps = [line for line in Path("/proc/self/maps").read_text().splitlines()
                if c.addr <= int(line.split("-")[0], 16) < c.addr + c.size]
        assert len(maps) == 3                     # two runs and the zero page between
    assert not _leases(store)


def test_a_private_composition_keeps_its_writes_to_itself(store, grid) -> None:
    layout = _layout(store, grid)
    materialise(store, [d for _, d in layout])
    with compose(store, layout, 4 * GRID, private=True) as mine, \
            compose(store, layout, 4 * GRID) as shared:
        ctypes.memset(mine.addr, 0xAB, 2 * GRID)
        assert _range(mine.addr, 2) == b"\xab\xab"
        assert _range(shared.addr, GRID) == grid[0]
    assert store.get(layout[0][1]) == grid[0]                 # the pack is untouched


def test_two_processes_composing_one_base_share_its_pages(store, grid, tmp_path) -> None:
    """The density promise at its root: a second process's mapping of the same chunks
    uses the same page-cache pages, so each process's PSS for them is half its RSS."""
    layout = _layout(store, grid)
    materialise(store, [d for _, d in layout])
    size = 4 * GRID
    child = textwrap.dedent(f"""
        import ctypes, sys
        from stellarium_core.hashing import Blake3Hasher
        from stellarium_core.nebula import ChunkStore
        from stellarium_core.nebula.compose import compose
        store = ChunkStore.open({str(store.root)!r}, Blake3Hasher({{}}))
        layout = [(o, bytes.fromhex(h)) for o, h in {[(o, d.hex()) for o, d in layout]!r}]
        c = compose(store, layout, {size})
        ctypes.string_at(c.addr, {size})
        print("ready", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with compose(store, layout, size) as c:
            _range(c.addr, size)
            rss, pss = _smaps(c.addr, size)
        pages = sum(-(-len(data) // PAGE) for data in grid.values())
        assert rss == pages * PAGE // 1024        # the chunks' pages, the holes cost none
        assert pss * 2 <= rss + 8, (rss, pss)     # and each is shared with the child
    finally:
        proc.communicate("", timeout=30)


def _smaps(addr: int, size: int) -> tuple[int, int]:
    """(Rss, Pss) in KiB of this process's mappings inside [addr, addr + size)."""
    rss = pss = 0
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = addr <= lo and hi <= addr + size
        elif inside and head == "Rss:":
            rss += int(line.split()[1])
        elif inside and head == "Pss:":
            pss += int(line.split()[1])
    return rss, pss


@pytest.mark.parametrize("offsets, size, error", [
    ((100, GRID), 4 * GRID, "page-aligned"),
    ((0, PAGE), 4 * GRID, "not overlap"),
    ((GRID, 0), 4 * GRID, "sorted"),
    ((0, 3 * GRID + PAGE), 4 * GRID, "reaches past the end"),
    ((0, GRID), 4 * GRID + 1, "multiple of"),
])
def test_bad_layouts_are_refused_and_leave_nothing_leased(store, grid, offsets, size,
                                                          error) -> None:
    layout = _layout(store, grid)[:2]
    materialise(store, [d for _, d in layout])
    with pytest.raises(ChunkError, match=error):
        compose(store, [(o, d) for o, (_, d) in zip(offsets, layout, strict=True)], size)
    assert not _leases(store)


def test_a_missing_or_unmappable_chunk_is_an_error_before_anything_is_mapped(store,
                                                                               grid) -> None:
    layout = _layout(store, grid)
    with pytest.raises(ChunkError, match="not stored mappable"):
        compose(store, layout, 4 * GRID)                     # not materialised yet
    with pytest.raises(MissingChunkError):
        compose(store, [(0, layout[0][1]), (GRID, bytes(32))], 4 * GRID)
    assert not _leases(store)


def test_a_truncated_pack_is_a_clear_error_not_a_sigbus(store, grid) -> None:
    layout = _layout(store, grid)
    materialise(store, [d for _, d in layout])
    e = store.entry(layout[0][1])
    os.truncate(store.pack_path(e.pack), e.offset + PAGE)
    with pytest.raises(CorruptChunkError, match="truncated"):
        compose(store, layout, 4 * GRID)
    assert not _leases(store)
