"""The guest side of any virtio device, for tests that play the driver: guarded guest RAM,
split rings per queue, a small real event loop standing in for the VMM's, and a hostile
ring writer for fuzzing.

Guest RAM is a bytearray with guard bands on both sides; the device sees only the middle
(``RegionMemory`` over that slice), so :meth:`GuestRam.check_guards` proves that nothing
the device did reached outside guest memory. Queue ``i`` keeps its rings at
``ring_base(i)`` and builds chains from its own heap, so queues never overlap.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import select
import signal
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stellarium_core.virtio import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    MemoryRegion,
    QueueEventfds,
    RegionMemory,
    Virtqueue,
)

GUARD = 4096
GUARD_BYTE = 0xA5
QSIZE = 64
HEAP_BASE = 0x100000
HEAP_SIZE = 0x100000
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")


def ring_base(queue: int) -> int:
    """Where queue ``queue``'s descriptor table starts (avail +4 KiB, used +8 KiB)."""
    return 0x10000 * (queue + 1)


def heap_base(queue: int) -> int:
    return HEAP_BASE + queue * HEAP_SIZE


class GuestRam:
    """``size`` bytes of guest RAM at guest address 0 between two guard bands.

    It is a page-aligned mapping like a VMM's guest RAM, so a device that gives pages
    back to the host (the balloon) can be tested on it; with ``memfd`` it is a shared
    memfd mapping whose region names the fd, as Volt's guest RAM is.
    """

    def __init__(self, size: int = 8 << 20, *, memfd: bool = False) -> None:
        self.fd = -1
        if memfd:
            self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, GUARD + size + GUARD)
            self.raw = mmap.mmap(self.fd, GUARD + size + GUARD, mmap.MAP_SHARED)
        else:
            self.raw = mmap.mmap(-1, GUARD + size + GUARD,
                                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.raw[:GUARD] = bytes([GUARD_BYTE]) * GUARD
        self.raw[-GUARD:] = bytes([GUARD_BYTE]) * GUARD
        self.ram = memoryview(self.raw)[GUARD:GUARD + size]
        host = ctypes.addressof(ctypes.c_char.from_buffer(self.raw)) + GUARD
        self.mem = RegionMemory([(MemoryRegion(0, size, host, self.fd, GUARD), self.ram)])
        self.size = size

    def check_guards(self) -> None:
        pattern = bytes([GUARD_BYTE]) * GUARD
        assert self.raw[:GUARD] == pattern, "a device wrote below guest RAM"
        assert self.raw[-GUARD:] == pattern, "a device wrote above guest RAM"


class Ring:
    """The driver side of one split queue: offer chains, kick, collect used buffers."""

    def __init__(self, ram: GuestRam, queue: int, size: int = QSIZE) -> None:
        self.ram, self.index, self.size = ram, queue, size
        base = ring_base(queue)
        self.desc, self.avail, self.used_addr = base, base + 0x1000, base + 0x2000
        self.heap = heap_base(queue)
        self.next_desc = 0
        self.avail_idx = self.used_seen = 0
        self.free_heap = self.heap

    def virtqueue(self, max_size: int) -> Virtqueue:
        q = Virtqueue(max_size)
        q.size = self.size
        q.desc_addr, q.avail_addr, q.used_addr, q.ready = self.desc, self.avail, \
            self.used_addr, True
        return q

    def _alloc(self, n: int) -> int:
        if self.free_heap + n > self.heap + HEAP_SIZE:
            self.free_heap = self.heap
        addr = self.free_heap
        self.free_heap += (max(n, 1) + 63) & ~63
        return addr

    def add(self, bufs: list[tuple[bytes | int, bool]]) -> tuple[int, list[int]]:
        """Chain ``(data or length, device-writable)`` buffers and offer them (no kick).
        Returns the head and each buffer's guest address."""
        ram, addrs = self.ram.ram, []
        head = self.next_desc
        for i, (b, write) in enumerate(bufs):
            n = b if isinstance(b, int) else len(b)
            addr = self._alloc(n)
            if not isinstance(b, int):
                ram[addr:addr + n] = b
            d = (head + i) % self.size
            flags = (VIRTQ_DESC_F_WRITE if write else 0) | \
                (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
            _DESC.pack_into(ram, self.desc + 16 * d, addr, n, flags, (d + 1) % self.size)
            addrs.append(addr)
        self.next_desc = (head + len(bufs)) % self.size
        _U16.pack_into(ram, self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        _U16.pack_into(ram, self.avail + 4 + 2 * self.size, self.used_seen & 0xFFFF)
        self.avail_idx += 1
        _U16.pack_into(ram, self.avail + 2, self.avail_idx & 0xFFFF)
        return head, addrs

    def used(self) -> list[tuple[int, int]]:
        """Every (head, written) returned since the last call."""
        out = []
        (idx,) = _U16.unpack_from(self.ram.ram, self.used_addr + 2)
        while self.used_seen & 0xFFFF != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack_from("<II", self.ram.ram, self.used_addr + 4 + 8 * slot))
            self.used_seen += 1
        return out

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.ram.ram[addr:addr + n])


class TestLoop:
    """A real epoll loop with the ``EventLoop`` contract; the test turns it by hand."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self.callbacks: dict[int, Callable[[int], None]] = {}

    def add(self, fd: int, callback: Callable[[int], None], events: int = select.EPOLLIN) -> None:
        if fd in self.callbacks:
            raise ValueError(f"fd {fd} is already registered")
        self._ep.register(fd, events)
        self.callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        if fd not in self.callbacks:
            raise ValueError(f"fd {fd} is not registered")
        self._ep.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self.callbacks.pop(fd, None) is None:
            raise ValueError(f"fd {fd} is not registered")
        with contextlib.suppress(OSError):
            self._ep.unregister(fd)

    def turn(self, timeout: float = 0.0) -> int:
        """Dispatch what is ready (waiting up to ``timeout`` s); returns how many fired."""
        events = self._ep.poll(timeout)
        for fd, ev in events:
            cb = self.callbacks.get(fd)
            if cb is not None:
                cb(ev)
        return len(events)

    def close(self) -> None:
        self._ep.close()


@dataclass
class TestLink:
    """A ``DeviceLink`` over a :class:`TestLoop`: records resets and config interrupts."""

    loop: TestLoop = field(default_factory=TestLoop)
    resets: list[str] = field(default_factory=list)
    config_changes: int = 0
    #: (host address, size, readonly) of each map_memory call.
    mapped: list[tuple[int, int, bool]] = field(default_factory=list)

    def config_changed(self) -> None:
        self.config_changes += 1

    def needs_reset(self, reason: str) -> None:
        self.resets.append(reason)

    def queue_eventfds(self, queue: int) -> QueueEventfds:
        raise RuntimeError("no KVM irqfd in a unit test")

    def map_memory(self, addr: int, size: int, readonly: bool) -> int:
        """Records the request; places each range at the next 4 GiB boundary."""
        self.mapped.append((addr, size, readonly))
        return len(self.mapped) << 32


class Rig:
    """A device activated over guarded RAM with one :class:`Ring` per queue."""

    def __init__(self, device: object, features: int | None = None,
                 ram_size: int = 8 << 20, qsize: int = QSIZE, memfd: bool = False) -> None:
        self.dev = device
        self.ram = GuestRam(ram_size, memfd=memfd)
        self.link = TestLink()
        attach = getattr(device, "attach", None)
        if attach is not None:
            attach(self.link)
        self.interrupts = 0
        self.rings = [Ring(self.ram, i, min(qsize, n)) for i, n in enumerate(device.queue_sizes)]
        self.activate(features)

    def activate(self, features: int | None = None) -> None:
        dev = self.dev
        self.queues = [r.virtqueue(n) for r, n in zip(self.rings, dev.queue_sizes, strict=True)]
        for q in self.queues:
            q.check(self.ram.mem)
        dev.activate(dev.features if features is None else features, self.ram.mem,
                     self.queues, self._irq)

    def _irq(self) -> None:
        self.interrupts += 1

    def restart(self) -> None:
        """Reset the device and start over on zeroed rings (one fuzz example after another)."""
        self.dev.reset()
        self.link.resets.clear()
        for r in self.rings:         # the rings, and the start of the heap fuzzing writes
            self.ram.ram[r.desc:r.desc + 0x3000] = bytes(0x3000)
            self.ram.ram[r.heap:r.heap + 0x10000] = bytes(0x10000)
            r.avail_idx = r.used_seen = r.next_desc = 0
            r.free_heap = r.heap
        self.activate()

    def kick(self, queue: int) -> None:
        self.dev.notify(queue)

    def turn(self, timeout: float = 0.0) -> int:
        return self.link.loop.turn(timeout)

    def settle(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        """Turn the loop until ``until()`` holds (AssertionError after ``timeout`` s)."""
        import time

        end = time.monotonic() + timeout
        while not until():
            if time.monotonic() > end:
                raise AssertionError("the device did not get there in time")
            self.turn(0.05)

    def close(self) -> None:
        close = getattr(self.dev, "close", None)
        if close is not None:
            close()
        self.link.loop.close()


# -- fuzzing -----------------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging when the block runs longer than ``seconds``."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"the device did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#: Examples per fuzz test (issue #14: at least 10,000 random tables, rings and requests).
FUZZ_EXAMPLES = 10_000


def fuzz_settings() -> object:
    """Hypothesis settings for the device fuzz tests: many quick examples, reproducible."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck))


def fuzz_strategy(payloads: object = None) -> object:
    """A hypothesis strategy for one hostile ring: (descriptors, heads, avail_moved, payloads).

    Descriptors point mostly into the queue's heap (with lengths around the headers
    devices parse), sometimes past the end of RAM, at the rings themselves, or at
    absurd addresses; flags and ``next`` are arbitrary; the avail index may jump
    past the queue size. ``payloads`` (a strategy of bytes) fills the buffers, so a
    device-specific one can make well-formed headers common.
    """
    from hypothesis import strategies as st

    addr = st.one_of(
        st.integers(0, HEAP_SIZE - 1).map(lambda o: ("heap", o)),
        st.sampled_from([("abs", 0), ("abs", 8 << 20), ("abs", (8 << 20) - 8),
                         ("abs", 1 << 63), ("abs", 0xFFFF_FFFF_FFFF_F000), ("ring", 0)]),
    )
    length = st.one_of(st.sampled_from([0, 1, 10, 12, 44, 45, 64, 4096]),
                       st.integers(0, 70000), st.integers(0, 0xFFFF_FFFF))
    desc = st.tuples(addr, length, st.integers(0, 7), st.integers(0, QSIZE + 2))
    data = payloads if payloads is not None else st.binary(max_size=128)
    return st.tuples(st.lists(desc, min_size=1, max_size=8),
                     st.lists(st.integers(0, QSIZE + 2), min_size=1, max_size=8),
                     st.integers(0, QSIZE + 4),
                     st.lists(data, min_size=1, max_size=4))


def write_hostile(ring: Ring, program: tuple) -> None:
    """Lay ``program`` (from :func:`fuzz_strategy`) into ``ring``'s table and avail ring."""
    descs, heads, moved, payloads = program
    ram = ring.ram.ram
    cursor = 0
    for i, ((kind, value), length, flags, nxt) in enumerate(descs):
        if kind == "heap":
            addr = ring.heap + value
        elif kind == "ring":
            addr = ring.desc
        else:
            addr = value
        _DESC.pack_into(ram, ring.desc + 16 * (i % ring.size), addr % (1 << 64),
                        length, flags, nxt)
    for p in payloads:               # buffer contents: the heap, front to back
        ram[ring.heap + cursor:ring.heap + cursor + len(p)] = p
        cursor += len(p)
    for j in range(max(moved, 1)):
        _U16.pack_into(ram, ring.avail + 4 + 2 * ((ring.avail_idx + j) % ring.size),
                       heads[j % len(heads)] % 0x10000)
    ring.avail_idx += moved
    _U16.pack_into(ram, ring.avail + 2, ring.avail_idx & 0xFFFF)

