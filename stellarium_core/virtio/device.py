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

Snapshots are optional for a device, so older plugins stay valid. The transport saves
what it holds for every device (:meth:`DeviceState.save`: status, features, config
generation, each queue's layout and ring indices); a device with nothing more (rng,
pmem) implements nothing. A device with state of its own beyond its queues (the
balloon's target and held stats buffer, vsock's connections) is a
:class:`StatefulDevice`. Before a snapshot the VMM stops delivering kicks and fd events
to every device (all device work runs in its I/O thread, so a device served there has
nothing in flight once that thread holds still); a device whose requests run elsewhere
(a kernel or another process serving handed-over queues) is a :class:`QuiescingDevice`,
or the VMM refuses to snapshot it.

Nothing here knows about KVM or any particular VMM.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from stellarium_core.virtio.memory import GuestMemory
from stellarium_core.virtio.queue import VIRTIO_RING_F_EVENT_IDX, Virtqueue
from stellarium_core.virtio.state import StateError, unpack_state

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


@runtime_checkable
class StatefulDevice(VirtioDevice, Protocol):
    """A device with state beyond its queues' (which the transport saves) for snapshots.

    ``save_state`` runs with the device quiesced (no kick or fd event is delivered) and
    returns the device's own state as bytes. ``restore_state`` gets those bytes on a
    newly made device of the same kind, after the transport restored its status and
    queues and, when the driver had set DRIVER_OK (and no NEEDS_RESET), activated it
    with the saved features and queues; before any vCPU runs. The bytes are untrusted:
    anything malformed raises ValueError. Needed by devices holding guest-visible
    state of their own: a config space the driver writes, a buffer popped from a queue
    and kept, a session the guest must learn is gone (vsock: its transport reset).
    """

    def save_state(self) -> bytes: ...

    def restore_state(self, data: bytes) -> None: ...


@runtime_checkable
class QuiescingDevice(VirtioDevice, Protocol):
    """A device whose requests may be in flight outside the VMM's I/O thread (a worker
    thread, a kernel or another process serving queues it handed over).

    ``quiesce`` stops taking new requests and returns how many are still in flight; the
    VMM calls it, in its I/O thread, until it returns 0 (or gives up after a timeout)
    and then expects each queue's ``last_avail`` and ``used_idx`` to be current.
    ``resume`` lets it take requests again (the VM carries on after the snapshot).
    """

    def quiesce(self) -> int: ...

    def resume(self) -> None: ...


_U32_MAX, _U64_MAX = 0xFFFFFFFF, (1 << 64) - 1
_ACTIVE = STATUS_DRIVER_OK | STATUS_FEATURES_OK


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
            try:
                self._activate(mem, interrupt)
            except ValueError:
                self.status |= STATUS_NEEDS_RESET

    def _activate(self, mem: GuestMemory, interrupt: Callable[[], None]) -> None:
        event_idx = bool(self.driver_features & VIRTIO_RING_F_EVENT_IDX)
        for q in self.queues:
            q.event_idx = event_idx
            if q.ready:
                q.check(mem)
        self.device.activate(self.driver_features, mem, self.queues, interrupt)

    def save(self) -> dict[str, Any]:
        """Status, accepted features, config generation and every queue, JSON-able."""
        return {"status": self.status, "driver_features": self.driver_features,
                "config_generation": self.config_generation,
                "queues": [q.save() for q in self.queues]}

    def restore(self, state: object, mem: GuestMemory,
                interrupt: Callable[[], None]) -> None:
        """Take a state :meth:`save` made, without the driver: the device is activated with
        the saved features and queues when the driver had set DRIVER_OK and FEATURES_OK
        (and no NEEDS_RESET: such a device waits for the driver's reset unactivated).
        Untrusted input: anything malformed, features this device does not offer, or a
        queue :meth:`Virtqueue.restore` refuses raises :class:`StateError` and changes
        nothing; what ``activate`` raises is raised."""
        s = unpack_state(state, "device state", {
            "status": (0, 0xFF), "driver_features": (0, _U64_MAX),
            "config_generation": (0, _U32_MAX), "queues": list})
        extra = s["driver_features"] & ~self.device.features
        if extra:
            raise StateError(f"device state: accepted features {extra:#x} that this device "
                             f"does not offer (it offers {self.device.features:#x})")
        if s["status"] & STATUS_FEATURES_OK and not s["driver_features"] & VIRTIO_F_VERSION_1:
            raise StateError("device state: FEATURES_OK without VIRTIO_F_VERSION_1")
        if len(s["queues"]) != len(self.device.queue_sizes):
            raise StateError(f"device state: {len(s['queues'])} queues saved, the device "
                             f"has {len(self.device.queue_sizes)}")
        queues = [Virtqueue(n) for n in self.device.queue_sizes]
        for i, (q, saved) in enumerate(zip(queues, s["queues"], strict=True)):
            try:
                q.restore(saved, mem)
            except StateError as exc:
                raise StateError(f"queue {i}: {exc}") from None
        self.status, self.driver_features = s["status"], s["driver_features"]
        self.config_generation, self.queues = s["config_generation"], queues
        if self.status & (_ACTIVE | STATUS_NEEDS_RESET) == _ACTIVE:
            self._activate(mem, interrupt)

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
