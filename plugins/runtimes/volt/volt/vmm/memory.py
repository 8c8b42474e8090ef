"""Guest physical memory: one anonymous mmap per region, bounds-checked access.

The mapping is made with libc ``mmap`` so its host address can be handed to
``KVM_SET_USER_MEMORY_REGION`` and so huge pages (MAP_HUGETLB) can be asked for.
Every accessor checks the guest range against the regions first: a loader bug
or a hostile descriptor gets a :class:`GuestMemoryError`, never a host segfault.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass

# The process's own symbols include libc; find_library would spawn ldconfig (slow start).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000
MADV_MERGEABLE = 12

#: The 32-bit MMIO hole: RAM that would land here is moved above 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000


class GuestMemoryError(ValueError):
    """A guest physical range is not (entirely) backed by guest RAM."""


@dataclass
class Region:
    """One contiguous slot of guest RAM."""

    guest_addr: int
    size: int
    host_addr: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """All guest RAM; below 3 GiB in one region, the rest above 4 GiB."""

    def __init__(self, size: int, *, hugepages: bool = False, ksm: bool = False) -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest memory size {size} is not a positive page multiple")
        self.size = size
        self.regions: list[Region] = []
        layout = [(0, min(size, MMIO_GAP_START))]
        if size > MMIO_GAP_START:
            layout.append((MMIO_GAP_END, size - MMIO_GAP_START))
        for guest_addr, length in layout:
            self.regions.append(self._map(guest_addr, length, hugepages))
            if ksm:
                r = self.regions[-1]
                _libc.madvise(r.host_addr, r.size, MADV_MERGEABLE)

    @staticmethod
    def _map(guest_addr: int, length: int, hugepages: bool) -> Region:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        # Huge pages are reserved at mmap time, so a shortage fails here and not later
        # as a SIGBUS inside the guest; normal pages are overcommitted like any VMM's.
        flags |= MAP_HUGETLB if hugepages else MAP_NORESERVE
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            hint = (" in huge pages (reserve them: /proc/sys/vm/nr_hugepages)"
                    if hugepages else "")
            raise GuestMemoryError(f"cannot map {length} bytes of guest memory{hint}: "
                                   f"{os.strerror(err)}")
        view = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
        return Region(guest_addr, length, addr, view)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap all guest RAM; views handed out before are released."""
        for r in self.regions:
            r.view.release()
            _libc.munmap(r.host_addr, r.size)
        self.regions.clear()

    @property
    def low_end(self) -> int:
        """End of the RAM below the 32-bit MMIO gap."""
        return self.regions[0].end

    def _find(self, addr: int, length: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.guest_addr <= addr and addr + length <= r.end and length >= 0:
                return r, addr - r.guest_addr
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is outside guest memory")

    def contains(self, addr: int, length: int) -> bool:
        try:
            self._find(addr, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, length: int) -> memoryview:
        """A writable window onto guest RAM (no copy)."""
        r, off = self._find(addr, length)
        return r.view[off:off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data

    def read_u16(self, addr: int) -> int:
        return struct.unpack_from("<H", self.view(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        return struct.unpack_from("<I", self.view(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return struct.unpack_from("<Q", self.view(addr, 8))[0]

    def write_u16(self, addr: int, value: int) -> None:
        struct.pack_into("<H", self.view(addr, 2), 0, value)

    def write_u32(self, addr: int, value: int) -> None:
        struct.pack_into("<I", self.view(addr, 4), 0, value)

    def write_u64(self, addr: int, value: int) -> None:
        struct.pack_into("<Q", self.view(addr, 8), 0, value)
