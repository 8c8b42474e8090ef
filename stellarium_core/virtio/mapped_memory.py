"""Guest memory that another process shares with us: mmaps of its memfd regions.

A vhost-user front-end (QEMU, Volt) hands its guest RAM over as file
descriptors plus a table of (guest address, size, front-end address, offset).
Everything in the table is checked before anything is mapped, and each fd must
be a memfd sealed against shrinking: a file that could be truncated under the
mapping would turn the next guest-memory access into a SIGBUS that kills the
server, not an error for one client.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from dataclasses import dataclass

#: Regions in one table (the vhost-user SET_MEM_TABLE limit).
MAX_REGIONS = 8
_U64 = 1 << 64


class MemoryTableError(ValueError):
    """A memory table that cannot be mapped safely; nothing of it was kept."""


@dataclass(frozen=True)
class RegionSpec:
    """One row of a front-end's memory table."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass
class _Region:
    spec: RegionSpec
    map: mmap.mmap
    view: memoryview          # exactly the region's bytes

    @property
    def guest_end(self) -> int:
        return self.spec.guest_addr + self.spec.size


class MappedMemory:
    """Bounds-checked access to the regions of the current table (a ``GuestMemory``).

    ``load`` replaces the whole table at once, so a device holding this object
    keeps working across a front-end's table updates; a rejected table leaves
    the previous one in place.
    """

    def __init__(self) -> None:
        self._regions: list[_Region] = []

    @property
    def regions(self) -> list[RegionSpec]:
        return [r.spec for r in self._regions]

    def load(self, specs: list[RegionSpec], fds: list[int]) -> None:
        """Check and map ``specs`` from ``fds`` (same order); the fds stay the caller's."""
        if not 1 <= len(specs) <= MAX_REGIONS:
            raise MemoryTableError(f"{len(specs)} regions; a table has 1..{MAX_REGIONS}")
        if len(fds) != len(specs):
            raise MemoryTableError(f"{len(specs)} regions but {len(fds)} file descriptors")
        _check_layout(specs)
        new: list[_Region] = []
        try:
            for i, (spec, fd) in enumerate(zip(specs, fds, strict=True)):
                new.append(_map(i, spec, fd))
        except BaseException:
            _unmap(new)
            raise
        old, self._regions = self._regions, new
        _unmap(old)

    def close(self) -> None:
        _unmap(self._regions)
        self._regions = []

    def user_to_guest(self, addr: int, length: int) -> int:
        """The guest address of front-end (user) address ``addr`` (vring addresses)."""
        for r in self._regions:
            s = r.spec
            if s.user_addr <= addr and addr + length <= s.user_addr + s.size:
                return s.guest_addr + addr - s.user_addr
        raise ValueError(f"front-end address {addr:#x}+{length:#x} is in no memory region")

    def view(self, addr: int, length: int) -> memoryview:
        """A writable window onto guest RAM (no copy)."""
        if length >= 0:
            for r in self._regions:
                if r.spec.guest_addr <= addr and addr + length <= r.guest_end:
                    off = addr - r.spec.guest_addr
                    return r.view[off:off + length]
        raise ValueError(f"guest range {addr:#x}+{length:#x} is outside guest memory")

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data


def _check_layout(specs: list[RegionSpec]) -> None:
    for i, s in enumerate(specs):
        if s.size <= 0:
            raise MemoryTableError(f"region {i} is empty")
        for name, start in (("guest", s.guest_addr), ("front-end", s.user_addr),
                            ("mmap offset", s.mmap_offset)):
            if start + s.size > _U64:
                raise MemoryTableError(f"region {i}: {name} range {start:#x}+{s.size:#x} "
                                       "wraps around")
    for key, name in ((lambda s: s.guest_addr, "guest"), (lambda s: s.user_addr, "front-end")):
        ordered = sorted(range(len(specs)), key=lambda i: key(specs[i]))
        for a, b in zip(ordered, ordered[1:], strict=False):
            if key(specs[a]) + specs[a].size > key(specs[b]):
                raise MemoryTableError(f"regions {a} and {b} overlap in {name} addresses")


def _map(i: int, spec: RegionSpec, fd: int) -> _Region:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        size = os.fstat(fd).st_size
    except OSError:
        raise MemoryTableError(f"region {i}: its file descriptor is not a memfd (no seals); "
                               "share guest RAM as a memfd sealed against shrinking") from None
    if not seals & fcntl.F_SEAL_SHRINK:
        raise MemoryTableError(f"region {i}: the memfd is not sealed against shrinking "
                               "(F_SEAL_SHRINK), so it could be truncated under the mapping")
    if spec.mmap_offset + spec.size > size:
        raise MemoryTableError(f"region {i}: offset {spec.mmap_offset:#x} + size "
                               f"{spec.size:#x} is past the end of its memfd ({size:#x} bytes)")
    start = spec.mmap_offset - spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
    lead = spec.mmap_offset - start
    try:
        m = mmap.mmap(fd, lead + spec.size, mmap.MAP_SHARED,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError, OverflowError) as exc:
        raise MemoryTableError(f"region {i}: cannot map {spec.size:#x} bytes: {exc}") from None
    return _Region(spec, m, memoryview(m)[lead:lead + spec.size])


def _unmap(regions: list[_Region]) -> None:
    for r in regions:
        r.view.release()
        try:
            r.map.close()
        except BufferError:       # a device still holds a window: unmapped when it lets go
            pass
