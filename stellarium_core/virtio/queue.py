"""Split virtqueues (virtio 1.x, section 2.7) read and written through guest memory.

The guest is untrusted: every descriptor is checked before its buffer is touched.
A chain is rejected (:class:`VirtqueueError`) when an address range is outside
guest memory, a ``next`` index is out of the table, the chain revisits a
descriptor (a loop) or is longer than the queue, a readable descriptor follows
a writable one, or the ring index jumps by more than the queue size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16


class VirtqueueError(ValueError):
    """The driver put something impossible or hostile in a queue."""


@runtime_checkable
class GuestMemory(Protocol):
    """What a device may do with guest memory: bounds-checked reads and writes.

    Both raise ``ValueError`` for a range not entirely inside guest RAM.
    """

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None: ...


@dataclass(frozen=True)
class Descriptor:
    """One buffer of a chain: guest address, length, and whether the device writes it."""

    addr: int
    length: int
    write: bool


@dataclass
class DescriptorChain:
    """A request popped from the available ring: validated buffers in order."""

    head: int
    descriptors: list[Descriptor]

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write]

    def read_all(self, mem: GuestMemory) -> bytes:
        """The concatenated driver-to-device bytes."""
        return b"".join(mem.read(d.addr, d.length) for d in self.readable)

    def write_all(self, mem: GuestMemory, data: bytes) -> int:
        """Scatter ``data`` into the device-writable buffers; returns bytes written."""
        done = 0
        for d in self.writable:
            if done >= len(data):
                break
            part = data[done:done + d.length]
            mem.write(d.addr, part)
            done += len(part)
        return done


class Virtqueue:
    """One split virtqueue as configured by the driver through the transport."""

    def __init__(self, max_size: int = 256) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail = 0
        self.used_idx = 0

    def check(self, mem: GuestMemory) -> None:
        """Validate the ring layout when the driver marks the queue ready."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise VirtqueueError(f"queue size {n} is not a power of two <= {self.max_size}")
        for name, addr, length, align in (("descriptor table", self.desc_addr, DESC_SIZE * n, 16),
                                          ("available ring", self.avail_addr, 6 + 2 * n, 2),
                                          ("used ring", self.used_addr, 6 + 8 * n, 4)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            _check_range(mem, addr, length, name)

    def avail_idx(self, mem: GuestMemory) -> int:
        return struct.unpack("<H", mem.read(self.avail_addr + 2, 2))[0]

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that we have not popped."""
        n = (self.avail_idx(mem) - self.last_avail) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"available index moved by {n}, more than the queue size "
                                 f"{self.size}")
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty."""
        if not self.ready or not self.pending(mem):
            return None
        slot = self.last_avail % self.size
        head = struct.unpack("<H", mem.read(self.avail_addr + 4 + 2 * slot, 2))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return DescriptorChain(head, list(self._walk(mem, head)))

    def drain(self, mem: GuestMemory) -> Iterator[DescriptorChain]:
        """Pop chains until the ring is empty."""
        while (chain := self.pop(mem)) is not None:
            yield chain

    def _walk(self, mem: GuestMemory, head: int) -> Iterator[Descriptor]:
        index, seen, writable_seen = head, set(), False
        while True:
            if index >= self.size:
                raise VirtqueueError(f"descriptor index {index} is outside the queue "
                                     f"(size {self.size})")
            if index in seen:
                raise VirtqueueError(f"descriptor chain from {head} loops back to {index}")
            if len(seen) >= self.size:
                raise VirtqueueError(f"descriptor chain from {head} is longer than the queue")
            seen.add(index)
            addr, length, flags, nxt = struct.unpack(
                "<QIHH", mem.read(self.desc_addr + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"descriptor {index}: indirect descriptors were not "
                                     "negotiated")
            _check_range(mem, addr, length, f"descriptor {index} buffer")
            write = bool(flags & VIRTQ_DESC_F_WRITE)
            if writable_seen and not write:
                raise VirtqueueError(f"descriptor {index}: readable buffer after a writable one")
            writable_seen |= write
            yield Descriptor(addr, length, write)
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            index = nxt

    def add_used(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes produced."""
        slot = self.used_idx % self.size
        mem.write(self.used_addr + 4 + 8 * slot, struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write(self.used_addr + 2, struct.pack("<H", self.used_idx))

    def wants_interrupt(self, mem: GuestMemory) -> bool:
        """False when the driver asked for no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        flags = struct.unpack("<H", mem.read(self.avail_addr, 2))[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


def _check_range(mem: GuestMemory, addr: int, length: int, what: str) -> None:
    if length == 0:
        return
    try:
        mem.read(addr, 1)
        mem.read(addr + length - 1, 1)
    except ValueError:
        raise VirtqueueError(f"{what} {addr:#x}+{length:#x} is outside guest memory") from None
    if length > 1 << 30:
        raise VirtqueueError(f"{what} {addr:#x}+{length:#x} is larger than 1 GiB")
