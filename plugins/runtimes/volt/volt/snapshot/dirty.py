"""Which 64 KiB cells of guest RAM changed since the last snapshot (for a Diff).

KVM's dirty log holds what the vCPUs wrote. The devices write guest RAM too (used
rings, block reads, received packets), from this process, and KVM never sees
that. Linux's soft-dirty page bits (``/proc/self/pagemap`` bit 55, reset through
``/proc/self/clear_refs``) see both, so a cell is dirty when either says so.
Where the kernel has no soft-dirty bits (built without CONFIG_MEM_SOFT_DIRTY, as
this project's dev machines are) a Diff cannot know what the devices wrote, and
reads every cell again: still correct, and the store still keeps only the chunks
that changed.
"""

from __future__ import annotations

import ctypes
import mmap
from array import array
from collections.abc import Callable, Iterable

from stellarium_core.virtio.memory import RegionMemory
from volt.snapshot.pages import CELL, PAGE, flat_regions

SOFT_DIRTY = 1 << 55
_probe: bool | None = None


def _clear() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")


def _entries(addr: int, pages: int) -> array:
    out = array("Q")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        out.frombytes(f.read(pages * 8))
    return out


def soft_dirty_works() -> bool:
    """Whether this kernel keeps soft-dirty bits (probed once, on a page of our own)."""
    global _probe
    if _probe is None:
        try:
            page = mmap.mmap(-1, PAGE)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
            _clear()
            page[0] = 1
            _probe = bool(_entries(addr, 1)[0] & SOFT_DIRTY)
            page.close()
        except OSError:
            _probe = False
    return _probe


def reset() -> None:
    """Start counting writes from now (soft-dirty bits are per process)."""
    if soft_dirty_works():
        _clear()


def cells(mem: RegionMemory, kvm_log: Iterable[tuple[int, bytes]] | None
          ) -> Callable[[int], bool] | None:
    """A test "was this flat cell written since :func:`reset`?", or None when nothing
    can tell (every cell must then be read again)."""
    if kvm_log is None or not soft_dirty_works():
        return None
    dirty: set[int] = set()
    for flat, bitmap in kvm_log:
        for i, byte in enumerate(bitmap):
            if byte:
                dirty.update((flat + (i * 8 + b) * PAGE) // CELL * CELL
                             for b in range(8) if byte >> b & 1)
    for flat, r in flat_regions(mem):
        for i, entry in enumerate(_entries(r.host_addr, r.size // PAGE)):
            if entry & SOFT_DIRTY:
                dirty.add((flat + i * PAGE) // CELL * CELL)
    return dirty.__contains__

