"""What devices that serve queues in the VMM's I/O thread share: the activation state,
giving up on a hostile ring, and announcing used buffers.

A device subclasses :class:`QueueDevice`, sets ``device_id``, ``features`` and
``queue_sizes``, and serves its queues in ``notify``. ``lock`` serialises the I/O
thread's work (kicks, host fd callbacks) against activation and reset, which the
transport calls from a vCPU thread. A ring the queue rejects
(:class:`~stellarium_core.virtio.VirtqueueError`: loops, buffers outside guest RAM)
goes to :meth:`QueueDevice.give_up`: the device stops touching its queues and asks
the driver for a reset (NEEDS_RESET) when the VMM offers a link.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from stellarium_core.virtio.device import DeviceLink
from stellarium_core.virtio.memory import GuestMemory
from stellarium_core.virtio.queue import Virtqueue

log = logging.getLogger(__name__)


def _no_interrupt() -> None:
    pass


class QueueDevice:
    """Lifecycle bookkeeping for a :class:`~stellarium_core.virtio.VirtioDevice`."""

    device_id: int
    features: int
    queue_sizes: tuple[int, ...]

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.link: DeviceLink | None = None
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue] = []
        self.interrupt: Callable[[], None] = _no_interrupt
        self.acked = 0
        self.broken = False

    def attach(self, link: DeviceLink) -> None:
        self.link = link

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        with self.lock:
            self.acked, self.mem, self.queues = features, mem, queues
            self.interrupt = interrupt
            self.broken = False

    def reset(self) -> None:
        with self.lock:
            self.mem = None
            self.queues = []
            self.interrupt = _no_interrupt
            self.acked = 0
            self.broken = False

    @property
    def active(self) -> bool:
        """Activated, and not given up on: queues may be served."""
        return self.mem is not None and not self.broken

    def read_config(self, offset: int, size: int) -> bytes:
        return self.config()[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """Read-only unless the device says otherwise."""

    def config(self) -> bytes:
        return b""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd`` on the event loop, if it is watched (closing, resets)."""
        if self.link is not None:
            try:
                self.link.loop.remove(fd)
            except ValueError:
                pass

    def metrics(self) -> dict[str, int]:
        """What the device counted (``counters``), for the VMM's metrics writer."""
        return dict(getattr(self, "counters", {}))

    def give_up(self, reason: str) -> None:
        """Stop serving until the driver resets the device."""
        self.broken = True
        if self.link is not None:
            self.link.needs_reset(reason)
        else:
            log.error("%s: %s; stopped until reset", type(self).__name__, reason)

    def used(self, queue: Virtqueue) -> None:
        """Interrupt the driver if it wants to hear about the buffers just used."""
        assert self.mem is not None
        try:
            wants = queue.wants_interrupt(self.mem)
        except ValueError:
            wants = True
        if wants:
            self.interrupt()
