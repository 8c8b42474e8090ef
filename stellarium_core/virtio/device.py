"""What a virtio device model provides, and the state a transport keeps for it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from stellarium_core.virtio.queue import GuestMemory, Virtqueue

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

    ``features`` are the bits the device offers (VIRTIO_F_VERSION_1 included);
    ``queue_sizes`` the maximum size of each queue. ``activate`` is called once
    the driver sets DRIVER_OK, with the features it accepted, guest memory, the
    ready queues, and ``interrupt`` to signal used buffers. ``notify(i)`` means
    queue ``i`` has new buffers. ``reset`` returns the device to its initial state.
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
        self.status = value
        if newly & STATUS_DRIVER_OK and value & STATUS_FEATURES_OK:
            try:
                for q in self.queues:
                    if q.ready:
                        q.check(mem)
                self.device.activate(self.driver_features, mem,
                                     self.queues, interrupt)
            except ValueError:
                self.status |= STATUS_NEEDS_RESET

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        for q in self.queues:
            q.reset()
        self.device.reset()
