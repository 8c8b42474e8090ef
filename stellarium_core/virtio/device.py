"""What a virtio device model provides, what a VMM offers it back, and the state a
transport keeps for it.

The core of the contract is :class:`VirtioDevice`: config space, ``activate``,
``notify``, ``reset``. A device that needs more from the VMM also defines
``attach(link)`` and receives a :class:`DeviceLink` once, before the guest runs:

- ``link.loop`` (an :class:`EventLoop`): watch host fds (a tap, a socket) with
  callbacks in the VMM's I/O thread, added and removed at any time from any thread;
- ``link.needs_reset(reason)``: give up until the driver resets the device
  (DEVICE_NEEDS_RESET, with a config-change interrupt; kicks stop arriving);
- ``link.config_changed()``: the config space changed (config-change interrupt);
- ``link.queue_eventfds(i)``: take queue ``i``'s notification and interrupt over as
  eventfds (kick: the guest's doorbell, call: the device's interrupt), so a kernel
  or external backend (vhost-net, vhost-user) serves the ring with no Python in
  the path. Guest memory's ``regions`` give that backend the memory to map;
- ``link.map_memory(addr, size, readonly)``: show ``size`` bytes of the VMM's own
  memory at ``addr`` to the guest as a guest-physical range of their own (a memory
  slot), so guest loads and stores reach it with no exit: device memory such as
  virtio-pmem's DAX window, whose place the driver learns from config space.

A device may also define ``close()``; the VMM calls it when the VM ends.
Nothing here knows about KVM or any particular VMM.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from stellarium_core.virtio.memory import GuestMemory
from stellarium_core.virtio.queue import VIRTIO_RING_F_EVENT_IDX, Virtqueue

VIRTIO_F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128


@runtime_checkable
class VirtioDevice(Protocol):
    """A device model. The transport calls these; the device never sees the transport.

    ``features`` are the bits the device offers (VIRTIO_F_VERSION_1 included, and
    VIRTIO_RING_F_EVENT_IDX when it pops its queues until empty, as ``drain`` does);
    ``queue_sizes`` the maximum size of each queue. ``activate`` is called once
    the driver sets DRIVER_OK, with the features it accepted, guest memory, the
    ready queues, and ``interrupt`` to signal used buffers. ``notify(i)`` means
    queue ``i`` has new buffers; it runs in the VMM's I/O thread. ``reset``
    returns the device to its initial state.
    """

    device_id: int
    features: int
    queue_sizes: tuple[int, ...]

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None: ...

    def notify(self, queue: int) -> None: ...

    def reset(self) -> None: ...


class EventLoop(Protocol):
    """The VMM's I/O thread as a device sees it. Thread-safe; usable any time after attach.

    ``add`` raises ValueError for an fd already registered; ``modify`` and ``remove``
    for one that is not. A callback gets the ready ``select.EPOLL*`` mask; fds should
    be non-blocking (a wake-up can be spurious). A callback that raises is removed
    and its device marked NEEDS_RESET; the loop and the VM carry on.
    """

    def add(self, fd: int, callback: Callable[[int], None],
            events: int = select.EPOLLIN) -> None: ...

    def modify(self, fd: int, events: int) -> None: ...

    def remove(self, fd: int) -> None: ...


@dataclass(frozen=True)
class QueueEventfds:
    """A queue handed over to a backend: it reads ``kick`` (the guest's notifications,
    a KVM ioeventfd) and writes ``call`` (the device's interrupt, a KVM irqfd). The VMM
    owns and closes both."""

    kick: int
    call: int


class DeviceLink(Protocol):
    """What the VMM offers a device beyond ``activate``: given once through ``attach``."""

    @property
    def loop(self) -> EventLoop: ...

    def config_changed(self) -> None: ...

    def needs_reset(self, reason: str) -> None: ...

    def queue_eventfds(self, queue: int) -> QueueEventfds:
        """Hand queue ``queue`` over for good: ``notify(queue)`` is not called any more.
        Raises RuntimeError when the VMM cannot (no irqfd in this KVM)."""
        ...

    def map_memory(self, addr: int, size: int, readonly: bool) -> int:
        """Map the host range [addr, addr + size) (page-aligned, valid until the VM is
        closed) into guest-physical space; returns its guest-physical address, aligned
        for memory hotplug. With ``readonly`` the guest's stores never reach it (the VMM
        drops and counts them). Only before the guest runs, i.e. from ``attach``.
        Raises RuntimeError when the VMM cannot (no read-only memory in this KVM)."""
        ...


@runtime_checkable
class LinkedDevice(VirtioDevice, Protocol):
    """A device that wants a :class:`DeviceLink`."""

    def attach(self, link: DeviceLink) -> None: ...


@runtime_checkable
class HostPathsDevice(VirtioDevice, Protocol):
    """A device that still opens host files once the VMM has confined itself (a store
    whose packs and manifests it reads and writes as the guest goes). The VMM's
    sandbox (Landlock) grants exactly these; a device that opened everything at
    creation needs nothing and does not implement this."""

    def host_paths(self) -> list[tuple[str, bool]]:
        """(path, writable) pairs: a file or a directory tree."""
        ...


@dataclass
class DeviceState:
    """Transport-independent negotiation state: status, feature words, queues."""

    device: VirtioDevice
    status: int = 0
    driver_features: int = 0
    queues: list[Virtqueue] = field(default_factory=list)
    config_generation: int = 0

    def __post_init__(self) -> None:
        if not self.device.features & VIRTIO_F_VERSION_1:
            raise ValueError("a modern virtio device must offer VIRTIO_F_VERSION_1")
        self.queues = [Virtqueue(n) for n in self.device.queue_sizes]

    @property
    def live(self) -> bool:
        """Activated and not waiting for a reset: notifications reach the device."""
        return self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET) == STATUS_DRIVER_OK

    def accept_features(self, word: int, value: int) -> None:
        """The driver writes 32 bits of its feature set; bits the device lacks are dropped."""
        if self.status & STATUS_FEATURES_OK or word > 1:
            return
        mask = 0xFFFFFFFF << (32 * word)
        offered = self.device.features & mask
        self.driver_features = (self.driver_features & ~mask) | ((value << (32 * word)) & offered)

    def set_status(self, value: int, mem: GuestMemory,
                   interrupt: Callable[[], None]) -> None:
        """Apply a status write: 0 resets; FEATURES_OK is checked; DRIVER_OK activates."""
        if value == 0:
            self.reset()
            return
        newly = value & ~self.status
        if newly & STATUS_FEATURES_OK and not self.driver_features & VIRTIO_F_VERSION_1:
            value &= ~STATUS_FEATURES_OK       # legacy drivers are refused
        self.status = value | (self.status & STATUS_NEEDS_RESET)
        if newly & STATUS_DRIVER_OK and value & STATUS_FEATURES_OK:
            event_idx = bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX)
            try:
                for q in self.queues:
                    q.event_idx = event_idx
                    if q.ready:
                        q.check(mem)
                self.device.activate(self.driver_features, mem,
                                     self.queues, interrupt)
            except ValueError:
                self.status |= STATUS_NEEDS_RESET

    def needs_reset(self) -> None:
        """The device cannot go on until the driver resets it."""
        self.status |= STATUS_NEEDS_RESET

    def config_changed(self) -> None:
        """The device changed its config space; the driver re-reads it (generation)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        for q in self.queues:
            q.reset()
        self.device.reset()
