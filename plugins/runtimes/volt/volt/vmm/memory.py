"""Guest RAM: one memfd mapped MAP_SHARED, so other processes can map the same pages.

A vhost-user backend or a snapshot writer maps the memfd (``regions`` give fd,
offset and guest address of each slot) and sees every guest write; the memfd is
sealed against shrinking and growing, so such a process can trust its size. With huge
pages the memfd is hugetlbfs-backed and the pages are reserved when it is mapped,
so a shortage is an error at start, not a SIGBUS in the guest later.

A restored VM's RAM is instead already mapped, copy-on-write from a snapshot's
chunks (:meth:`GuestMemory.mapped`); it is private to this process too.

KSM merges only private anonymous pages (the kernel ignores MADV_MERGEABLE on
shared and hugetlb mappings), so ``ksm=True`` maps private anonymous memory
instead and marks it mergeable; that memory is not shareable (``fd`` -1).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from typing import Protocol

from stellarium_core.virtio.memory import GuestMemoryError, MemoryRegion, RegionMemory

#: The 32-bit MMIO hole: RAM that would land here is moved above 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
HUGE_PAGE = 2 << 20
MAP_NORESERVE = 0x4000

__all__ = ["GuestMemory", "GuestMemoryError", "MMIO_GAP_END", "MMIO_GAP_START"]


def _huge_pages_available() -> str:
    """Free huge pages nobody has reserved yet, from /proc/meminfo."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return str(int(info["HugePages_Free"]) - int(info["HugePages_Rsvd"]))
    except (OSError, KeyError, ValueError):
        return "?"


class Closable(Protocol):
    def close(self) -> None: ...


def _layout(size: int) -> list[tuple[int, int]]:
    """(guest address, length) of the RAM regions of a ``size``-byte guest."""
    layout = [(0, min(size, MMIO_GAP_START))]
    if size > MMIO_GAP_START:
        layout.append((MMIO_GAP_END, size - MMIO_GAP_START))
    return layout


class GuestMemory(RegionMemory):
    """All guest RAM: below 3 GiB in one region, the rest above 4 GiB, one memfd behind both."""

    def __init__(self, size: int, *, hugepages: bool = False, ksm: bool = False) -> None:
        page = HUGE_PAGE if hugepages else mmap.PAGESIZE
        if size <= 0 or size % page:
            raise GuestMemoryError(f"guest memory size {size} is not a positive multiple of "
                                   f"the {page >> 10} KiB page size")
        if hugepages and ksm:
            raise GuestMemoryError("KSM cannot merge huge pages")
        self.fd = -1 if ksm else self._memfd(size, hugepages)
        self._maps: list[mmap.mmap] = []
        self._owner: Closable | None = None
        parts = []
        try:
            offset = 0
            for guest_addr, length in _layout(size):
                mm = self._map(length, offset, hugepages, ksm)
                self._maps.append(mm)
                host = ctypes.addressof(ctypes.c_char.from_buffer(mm))
                region = MemoryRegion(guest_addr, length, host, self.fd,
                                      offset if self.fd >= 0 else 0)
                parts.append((region, memoryview(mm)))
                offset += length
        except BaseException:
            self._unmap()
            raise
        super().__init__(parts)

    @classmethod
    def mapped(cls, addr: int, size: int, owner: Closable) -> GuestMemory:
        """``size`` bytes of RAM already mapped at host ``addr`` (flat: the regions end
        to end, as in the memfd), laid out as any guest RAM; :meth:`close` closes
        ``owner``, the mapping's keeper."""
        self = cls.__new__(cls)
        self.fd, self._maps, self._owner = -1, [], owner
        parts, offset = [], 0
        for guest_addr, length in _layout(size):
            buf = memoryview((ctypes.c_char * length).from_address(addr + offset)).cast("B")
            parts.append((MemoryRegion(guest_addr, length, addr + offset), buf))
            offset += length
        RegionMemory.__init__(self, parts)
        return self

    @staticmethod
    def _memfd(size: int, hugepages: bool) -> int:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (
            os.MFD_HUGETLB | os.MFD_HUGE_2MB if hugepages else 0)
        try:
            fd = os.memfd_create("volt-guest-ram", flags)
        except OSError as exc:
            kind = " in huge pages" if hugepages else ""
            raise GuestMemoryError(f"cannot create guest memory{kind}: "
                                   f"{exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            hint = (" (RLIMIT_FSIZE is lower; guest RAM is a memfd)"
                    if exc.errno == errno.EFBIG else "")
            raise GuestMemoryError(f"cannot size guest memory to {size >> 20} MiB: "
                                   f"{exc.strerror}{hint}") from None
        # Sealed against shrinking and growing: a process it is shared with (a vhost-user
        # back-end) then knows no truncate can turn its mapping into SIGBUS, and refuses
        # an unsealed one.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    def _map(self, length: int, offset: int, hugepages: bool, ksm: bool) -> mmap.mmap:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            if ksm:
                mm = mmap.mmap(-1, length, mmap.MAP_PRIVATE | MAP_NORESERVE, prot)
                mm.madvise(mmap.MADV_MERGEABLE)
                return mm
            return mmap.mmap(self.fd, length, mmap.MAP_SHARED, prot, offset=offset)
        except OSError as exc:
            if hugepages:
                raise GuestMemoryError(
                    f"cannot reserve {length >> 20} MiB of guest memory in 2 MiB huge pages "
                    f"({_huge_pages_available()} available; reserve more in "
                    f"/proc/sys/vm/nr_hugepages): "
                    f"{exc.strerror}") from None
            raise GuestMemoryError(f"cannot map {length >> 20} MiB of guest memory: "
                                   f"{exc.strerror}") from None

    @property
    def low_end(self) -> int:
        """End of the RAM below the 32-bit MMIO gap."""
        return self.regions[0].end

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.view(addr, 8), "little")

    def write_u64(self, addr: int, value: int) -> None:
        self.view(addr, 8)[:] = value.to_bytes(8, "little")

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unmap guest RAM. A mapping a device still holds a window into stays mapped
        until the process ends (never a dangling pointer)."""
        self.release()
        self._unmap()

    def _unmap(self) -> None:
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass
        self._maps.clear()
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
