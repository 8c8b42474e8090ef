"""Port-I/O and MMIO dispatch: address ranges to device handlers.

A device implements ``read(offset, size) -> bytes`` and ``write(offset, data)``;
offsets are relative to the range it was registered at. Each device has its own
lock, so vCPU threads serialize per device, not globally.
"""

from __future__ import annotations

import bisect
import threading
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusConflict(ValueError):
    """Two devices asked for overlapping ranges."""


class Bus:
    """Sorted, non-overlapping ranges; unclaimed reads return all ones, like a PC."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice, threading.Lock]] = []

    def add(self, base: int, length: int, device: BusDevice) -> None:
        i = bisect.bisect_right(self._starts, base)
        if i and self._entries[i - 1][0] + self._entries[i - 1][1] > base:
            raise BusConflict(f"{self.name}: {base:#x} overlaps an existing device")
        if i < len(self._entries) and base + length > self._entries[i][0]:
            raise BusConflict(f"{self.name}: {base:#x}+{length:#x} overlaps an existing device")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, length, device, threading.Lock()))

    def _lookup(self, addr: int) -> tuple[int, BusDevice, threading.Lock] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, length, dev, lock = self._entries[i]
            if addr < base + length:
                return base, dev, lock
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self._lookup(addr)
        if hit is None:
            return b"\xff" * size
        base, dev, lock = hit
        with lock:
            return dev.read(addr - base, size)

    def write(self, addr: int, data: bytes) -> bool:
        """Deliver a write; False when nothing claims the address."""
        hit = self._lookup(addr)
        if hit is None:
            return False
        base, dev, lock = hit
        with lock:
            dev.write(addr - base, data)
        return True
