"""The virtio persistent-memory device (virtio 1.2, section 5.19) over a read-only window.

The window is host memory the VMM maps into guest-physical space as a read-only memory
slot of its own (``link.map_memory``); its guest address and size are the config
space. Linux's virtio_pmem driver turns it into /dev/pmem0 with struct pages
(ZONE_DEVICE), so ext4 or EROFS mounted with ``-o dax`` reads files, and maps
executables, straight from the window: no copy into the guest's page cache, and no
exit to the VMM. The one queue carries flush requests; a read-only window has
nothing to write back, so each is answered at once.

A snapshot keeps where the window was (the guest mapped it there); a restore into a VM
that placed it elsewhere, or with another size, is refused.
"""

from __future__ import annotations

import json
import struct
from typing import Protocol

from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ChainTooShort,
    DeviceLink,
    QueueDevice,
    StateError,
    VirtqueueError,
    load_state,
)

DEVICE_ID = 27
QUEUE_SIZE = 64
REQ_FLUSH = 0
#: Response codes: 0 done, anything else an error the driver reports as EIO.
OK, EIO = 0, 1
_U32 = struct.Struct("<I")


class Window(Protocol):
    """Page-aligned host memory that stays mapped until ``close``."""

    addr: int
    size: int

    def close(self) -> None: ...


class VirtioPmem(QueueDevice):
    """A read-only pmem device over ``window``, which it closes with itself."""

    device_id = DEVICE_ID
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, window: Window) -> None:
        super().__init__()
        self.window = window
        #: Guest-physical address of the window, once the VMM has placed it.
        self.start: int | None = None
        self.counters = {"flushes": 0, "bad_requests": 0}

    def attach(self, link: DeviceLink) -> None:
        super().attach(link)
        self.start = link.map_memory(self.window.addr, self.window.size, readonly=True)

    def config(self) -> bytes:
        """``le64 start; le64 size``."""
        return struct.pack("<QQ", self.start or 0, self.window.size)

    def save_state(self) -> bytes:
        return json.dumps({"start": self.start, "size": self.window.size}).encode()

    def restore_state(self, data: bytes) -> None:
        """Check the window is where, and as large as, the guest knew it."""
        s = load_state(data, "virtio-pmem", {"start": (int, type(None)), "size": int})
        if (s["start"], s["size"]) != (self.start, self.window.size):
            raise StateError(f"virtio-pmem: the guest knew the window at {s['start']} with "
                             f"{s['size']} bytes; here it is at {self.start} with "
                             f"{self.window.size}")

    def notify(self, queue: int) -> None:
        with self.lock:
            if queue == 0 and self.active:
                self._serve()

    def _serve(self) -> None:
        mem, q = self.mem, self.queues[0]
        assert mem is not None
        used = 0
        try:
            for chain in q.drain(mem):
                out = chain.writer(mem)
                try:
                    (kind,) = chain.reader(mem).unpack(_U32)
                except ChainTooShort:
                    kind = -1
                status = OK if kind == REQ_FLUSH else EIO
                self.counters["flushes" if status == OK else "bad_requests"] += 1
                written = 0
                if out.remaining >= _U32.size:
                    out.pack(_U32, status)
                    written = _U32.size
                q.add_used(mem, chain.head, written)
                used += 1
        except VirtqueueError as exc:
            self.give_up(str(exc))
        if used:
            self.used(q)

    def close(self) -> None:
        self.window.close()
