"""Split virtqueues (virtio 1.x, section 2.7) read and written through guest memory.

The guest is untrusted: every descriptor is checked before its buffer is touched.
A chain is rejected (:class:`VirtqueueError`) when an address range is outside
guest memory, a ``next`` index is out of the table, the chain revisits a
descriptor (a loop) or is longer than the queue, a readable descriptor follows
a writable one, or the ring index jumps by more than the queue size.

The rings are accessed through windows onto guest memory taken once per
activation (``struct.unpack_from`` / ``pack_into``), so serving a request allocates
no copy of guest memory. With VIRTIO_RING_F_EVENT_IDX negotiated the queue keeps
``avail_event`` (kick me when you pass this index) when the ring runs empty and
honours the driver's ``used_event`` in :meth:`Virtqueue.wants_interrupt`.

For a snapshot, :meth:`Virtqueue.save` gives what defines a queue (layout and ring
indices) as a JSON-able dict, and :meth:`Virtqueue.restore` takes one back, checked
like the driver's register writes and activation are.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from stellarium_core.virtio.buffers import Reader, Writer
from stellarium_core.virtio.memory import GuestMemory
from stellarium_core.virtio.state import StateError, unpack_state

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTIO_RING_F_EVENT_IDX = 1 << 29
MAX_QUEUE_SIZE = 32768
DESC_SIZE = 16
MAX_BUFFER = 1 << 30

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_FENCE = threading.Lock()
_EMPTY = memoryview(b"")
_U16_MAX, _U64_MAX = 0xFFFF, (1 << 64) - 1
#: A saved queue's fields (event_idx is not among them: it follows the features).
_SAVED = {"max_size": (1, MAX_QUEUE_SIZE), "size": (1, MAX_QUEUE_SIZE), "ready": bool,
          "desc_addr": (0, _U64_MAX), "avail_addr": (0, _U64_MAX), "used_addr": (0, _U64_MAX),
          "last_avail": (0, _U16_MAX), "used_idx": (0, _U16_MAX),
          "signalled_used": (0, _U16_MAX)}


def _fence() -> None:
    """A full memory barrier between a store to the rings and the load that follows it.

    x86 may let a load pass an earlier store; the locked instruction of an uncontended
    lock acquire orders them, which the event-index handshake needs (spec 2.7.7.2).
    """
    with _FENCE:
        pass


class VirtqueueError(ValueError):
    """The driver put something impossible or hostile in a queue."""


@dataclass(slots=True)
class Descriptor:
    """One buffer of a chain: guest address, length, and whether the device writes it."""

    addr: int
    length: int
    write: bool


@dataclass(slots=True)
class DescriptorChain:
    """A request popped from the available ring: validated buffers in order.

    ``windows`` are the buffers as windows onto guest memory, taken when the queue
    checked them (readable ones first, then ``writable_from`` on); empty for a chain
    built by hand, whose windows are then taken from ``mem``.
    """

    head: int
    descriptors: list[Descriptor]
    windows: list[memoryview] = field(default_factory=list)
    writable_from: int = 0

    @property
    def readable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if not d.write]

    @property
    def writable(self) -> list[Descriptor]:
        return [d for d in self.descriptors if d.write]

    def reader(self, mem: GuestMemory) -> Reader:
        """The driver-to-device bytes as a stream (no copy until asked)."""
        if self.windows:
            return Reader(self.windows[:self.writable_from])
        return Reader.of(mem, self.readable)

    def writer(self, mem: GuestMemory) -> Writer:
        """The device-to-driver buffers as a stream."""
        if self.windows:
            return Writer(self.windows[self.writable_from:])
        return Writer.of(mem, self.writable)

    def read_all(self, mem: GuestMemory) -> bytes:
        """The concatenated driver-to-device bytes."""
        return self.reader(mem).read()

    def write_all(self, mem: GuestMemory, data: bytes) -> int:
        """Write as much of ``data`` as the device-writable buffers hold; returns that."""
        w = self.writer(mem)
        w.write(memoryview(data)[:w.remaining])
        return w.written


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
        #: Whether VIRTIO_RING_F_EVENT_IDX was negotiated (set at activation).
        self.event_idx = False
        self.signalled_used = 0
        self._mem: GuestMemory | None = None
        self._desc = self._avail = self._used = memoryview(b"")

    def check(self, mem: GuestMemory) -> None:
        """Validate the ring layout when the driver marks the queue ready."""
        n = self.size
        if not 1 <= n <= self.max_size or n & (n - 1):
            raise VirtqueueError(f"queue size {n} is not a power of two <= {self.max_size}")
        rings = (("descriptor table", self.desc_addr, DESC_SIZE * n, 16),
                 ("available ring", self.avail_addr, 6 + 2 * n, 2),
                 ("used ring", self.used_addr, 6 + 8 * n, 4))
        views = []
        for name, addr, length, align in rings:
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            views.append(_window(mem, addr, length, name))
        self._desc, self._avail, self._used = views
        self._mem = mem

    def save(self) -> dict[str, int | bool]:
        """Layout and ring indices, JSON-able (the queue's rings live in guest memory)."""
        return {k: getattr(self, k) for k in _SAVED}

    def restore(self, state: object, mem: GuestMemory) -> None:
        """Take a state :meth:`save` made. It is untrusted: a missing, unknown or
        out-of-range field, a size that is no power of two up to ``max_size``, or a ready
        queue's ring outside ``mem`` raises :class:`StateError` and changes nothing.
        ``event_idx`` is the activation's to set, from the features."""
        s = unpack_state(state, "virtqueue", _SAVED)
        if s["max_size"] != self.max_size:
            raise StateError(f"virtqueue: saved for a queue of at most {s['max_size']} "
                             f"entries, this device's holds {self.max_size}")
        scratch = Virtqueue(self.max_size)
        for k in _SAVED:
            setattr(scratch, k, s[k])
        n = scratch.size
        if n > self.max_size or n & (n - 1):
            raise StateError(f"virtqueue: size {n} is not a power of two <= {self.max_size}")
        if scratch.ready:
            try:
                scratch.check(mem)
            except VirtqueueError as exc:
                raise StateError(f"virtqueue: {exc}") from None
        self.reset()
        for k in _SAVED:
            setattr(self, k, s[k])

    def _bound(self, mem: GuestMemory) -> None:
        """Take the ring windows on first use (a queue used without ``check``)."""
        if self._mem is not mem:
            self.check(mem)

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that we have not popped."""
        self._bound(mem)
        return self._pending()

    def _pending(self) -> int:
        n = (_U16.unpack_from(self._avail, 2)[0] - self.last_avail) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"available index moved by {n}, more than the queue size "
                                 f"{self.size}")
        return n

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, validated; None when the ring is empty.

        With EVENT_IDX, an empty ring publishes ``avail_event`` and looks once more, so
        a buffer the driver added meanwhile is not left waiting for a kick that never
        comes: a device must pop until None before it waits for the next kick.
        """
        if not self.ready:
            return None
        if self._mem is not mem:
            self.check(mem)
        if not self._pending():
            if not self.event_idx:
                return None
            _U16.pack_into(self._used, 4 + 8 * self.size, self.last_avail)
            _fence()
            if not self._pending():
                return None
        slot = self.last_avail & (self.size - 1)
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(mem, head)

    def drain(self, mem: GuestMemory) -> Iterator[DescriptorChain]:
        """Pop chains until the ring is empty."""
        while (chain := self.pop(mem)) is not None:
            yield chain

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        index, size, table, view = head, self.size, self._desc, mem.view
        descs: list[Descriptor] = []
        wins: list[memoryview] = []
        writable_from = -1
        seen = 0                                   # bitmask of visited descriptors
        while True:
            if index >= size:
                raise VirtqueueError(f"descriptor index {index} is outside the queue "
                                     f"(size {size})")
            bit = 1 << index
            if seen & bit:
                raise VirtqueueError(f"descriptor chain from {head} loops back to {index}")
            seen |= bit
            addr, length, flags, nxt = _DESC.unpack_from(table, index << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise VirtqueueError(f"descriptor {index}: indirect descriptors were not "
                                     "negotiated")
            if not length:
                wins.append(_EMPTY)
            elif length > MAX_BUFFER:
                raise VirtqueueError(f"descriptor {index} buffer {addr:#x}+{length:#x} is "
                                     "larger than 1 GiB")
            else:
                try:
                    wins.append(view(addr, length))
                except ValueError:
                    raise VirtqueueError(f"descriptor {index} buffer {addr:#x}+{length:#x} is "
                                         "outside guest memory") from None
            if flags & VIRTQ_DESC_F_WRITE:
                if writable_from < 0:
                    writable_from = len(descs)
                descs.append(Descriptor(addr, length, True))
            elif writable_from >= 0:
                raise VirtqueueError(f"descriptor {index}: readable buffer after a writable one")
            else:
                descs.append(Descriptor(addr, length, False))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, descs, wins,
                                       writable_from if writable_from >= 0 else len(descs))
            index = nxt

    def add_used(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes produced."""
        self._bound(mem)
        slot = self.used_idx & (self.size - 1)
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)

    def wants_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the driver asked to be interrupted for the buffers used since the last
        call: its ``used_event`` (EVENT_IDX) or else VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self._bound(mem)
        if not self.event_idx:
            return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        _fence()
        event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
        return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _window(mem: GuestMemory, addr: int, length: int, what: str) -> memoryview:
    if length > MAX_BUFFER:
        raise VirtqueueError(f"{what} {addr:#x}+{length:#x} is larger than 1 GiB")
    try:
        return mem.view(addr, length)
    except ValueError:
        raise VirtqueueError(f"{what} {addr:#x}+{length:#x} is outside guest memory") from None
