"""Guest memory as a device sees it: bounds-checked windows, and regions another process can map.

A VMM hands devices a :class:`GuestMemory`. Every access is checked against the
regions first: a hostile descriptor gets a :class:`GuestMemoryError` (a ValueError),
never a host segfault. ``view`` returns a window onto guest RAM, not a copy, so a
request's data moves host <-> guest once. ``regions`` says where each slot lives on
the host: its address here, and the file (a memfd) and offset backing it, so a
vhost-user backend or a snapshot writer in another process can map the same pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class GuestMemoryError(ValueError):
    """A guest physical range is not (entirely) backed by guest RAM."""


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous slot of guest RAM.

    ``host_addr`` is where it is mapped in this process (what KVM's memory slot and
    vhost-net's ``userspace_addr`` take); ``fd`` and ``fd_offset`` name the file
    backing it, which another process can mmap (MAP_SHARED) to see the same pages.
    ``fd`` is -1 when the memory is private to this process.
    """

    guest_addr: int
    size: int
    host_addr: int
    fd: int = -1
    fd_offset: int = 0

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    @property
    def shareable(self) -> bool:
        return self.fd >= 0


@runtime_checkable
class GuestMemory(Protocol):
    """What a device may do with guest memory. Every method raises a ValueError
    (:class:`GuestMemoryError`) for a range not entirely inside one region."""

    @property
    def regions(self) -> Sequence[MemoryRegion]: ...

    def view(self, addr: int, length: int) -> memoryview: ...

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...


class RegionMemory:
    """:class:`GuestMemory` over one host buffer per region.

    A VMM builds it over its guest RAM mappings; device tests and tools build it
    over a bytearray (:meth:`over`). The first region is checked first: it holds
    everything below the 32-bit MMIO gap, so nearly every access ends there.
    """

    def __init__(self, parts: Sequence[tuple[MemoryRegion, memoryview]]) -> None:
        for r, buf in parts:
            if len(buf) != r.size or buf.readonly:
                raise ValueError(f"region at {r.guest_addr:#x}: need a writable buffer of "
                                 f"{r.size} bytes")
        self._parts = [(r.guest_addr, r.size, buf) for r, buf in parts]
        self._regions = [r for r, _ in parts]

    @classmethod
    def over(cls, buf: bytearray | memoryview, guest_addr: int = 0) -> RegionMemory:
        """One private region at ``guest_addr`` backed by ``buf`` (for tests and tools)."""
        import ctypes

        view = memoryview(buf).cast("B")
        host = ctypes.addressof(ctypes.c_char.from_buffer(view)) if len(view) else 0
        return cls([(MemoryRegion(guest_addr, len(view), host), view)])

    @property
    def regions(self) -> list[MemoryRegion]:
        return list(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def view(self, addr: int, length: int) -> memoryview:
        """A writable window onto guest RAM (no copy)."""
        for base, size, buf in self._parts:
            off = addr - base
            if 0 <= off and 0 <= length <= size - off:
                return buf[off:off + length]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest memory")

    def contains(self, addr: int, length: int) -> bool:
        return any(0 <= addr - base and 0 <= length <= size - (addr - base)
                   for base, size, _ in self._parts)

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def release(self) -> None:
        """Forget the buffers (before their owner unmaps them); later accesses fail."""
        for _, _, buf in self._parts:
            buf.release()
        self._parts.clear()
