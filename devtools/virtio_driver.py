"""The driver side of a virtio-blk split ring, for tests that play the guest.

Guest RAM is any writable buffer addressed from 0 (a bytearray the device sees
through ``stellarium_core.virtio.RegionMemory.over``, or the mmap of a memfd a
vhost-user front-end shares). ``kick`` tells the device; ``wait``
blocks until it signalled used buffers (or does nothing for inline devices).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
DESC, AVAIL, USED, HEAP = 0x1000, 0x3000, 0x4000, 0x10000
QSIZE = 128


class BlkDriver:
    """Builds request chains from descriptor 0, offers them, kicks, reads the used ring."""

    def __init__(self, ram: bytearray | memoryview, kick: Callable[[], None],
                 wait: Callable[[], None] = lambda: None) -> None:
        self.ram, self.kick, self.wait = ram, kick, wait
        self.avail_idx = self.used_seen = 0

    @classmethod
    def inline(cls, device: Any, ram_size: int = 8 << 20) -> BlkDriver:
        """A driver for ``device`` served inline: fresh RAM, the queue at DESC/AVAIL/USED,
        the device activated with every feature it offers; a kick is ``notify(0)``."""
        from stellarium_core.virtio import RegionMemory, Virtqueue

        ram = bytearray(ram_size)
        mem = RegionMemory.over(ram)
        q = Virtqueue(QSIZE)
        q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
        q.check(mem)
        device.activate(device.features, mem, [q], lambda: None)
        return cls(ram, lambda: device.notify(0))

    def submit(self, bufs: list[tuple[bytes | int, bool]]) -> list[int]:
        """Chain ``(data or length, device-writable)`` buffers; offer; kick.
        Returns each buffer's guest address."""
        addr, addrs = HEAP, []
        for i, (b, write) in enumerate(bufs):
            n = b if isinstance(b, int) else len(b)
            if not isinstance(b, int):
                self.ram[addr:addr + n] = b
            flags = (VIRTQ_DESC_F_WRITE if write else 0) | \
                (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
            struct.pack_into("<QIHH", self.ram, DESC + 16 * i, addr, n, flags, i + 1)
            addrs.append(addr)
            addr += (max(n, 1) + 15) & ~15
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), 0)
        # used_event (EVENT_IDX): interrupt me for the next used buffer, as Linux asks
        # when it waits for a request; ignored where EVENT_IDX was not negotiated.
        struct.pack_into("<H", self.ram, AVAIL + 4 + 2 * QSIZE, self.used_seen & 0xFFFF)
        self.avail_idx += 1
        struct.pack_into("<H", self.ram, AVAIL + 2, self.avail_idx & 0xFFFF)
        self.kick()
        return addrs

    def used(self) -> tuple[int, int] | None:
        """The next (head, written) in the used ring, or None when nothing was returned."""
        (idx,) = struct.unpack_from("<H", self.ram, USED + 2)
        if idx == self.used_seen & 0xFFFF:
            return None
        slot = self.used_seen % QSIZE
        self.used_seen += 1
        return struct.unpack_from("<II", self.ram, USED + 4 + 8 * slot)

    def request(self, rtype: int, sector: int = 0, out: bytes = b"",
                inlen: int = 0) -> tuple[int, bytes]:
        """One well-formed request: (status, data read)."""
        bufs: list[tuple[bytes | int, bool]] = [(struct.pack("<IIQ", rtype, 0, sector), False)]
        if out:
            bufs.append((out, False))
        if inlen:
            bufs.append((inlen, True))
        bufs.append((1, True))
        addrs = self.submit(bufs)
        self.wait()
        got = self.used()
        assert got is not None, "the device returned no buffer"
        head, written = got
        status = self.ram[addrs[-1]]
        assert head == 0 and written == (inlen + 1 if status == 0 else 1), (head, written)
        data = bytes(self.ram[addrs[-2]:addrs[-2] + inlen]) if inlen and status == 0 else b""
        return status, data
