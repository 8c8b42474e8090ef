"""The virtio device-model contract: split virtqueues over guest memory, features, config,
and what a VMM offers a device (event loop, reset and config interrupts, queue handover).

Device plugins implement :class:`VirtioDevice` and see guest memory only through
:class:`GuestMemory`, queues only as :class:`Virtqueue`, and request buffers as
:class:`Reader` / :class:`Writer`. A VMM transport (Volt's virtio-mmio) owns the
registers, tells the device when the driver is ready and when a queue was kicked,
and hands it a callable raising the interrupt; a device that wants more defines
``attach(link: DeviceLink)``; one with state of its own for snapshots is a
:class:`StatefulDevice`. Nothing here knows about KVM or any particular VMM.
"""

from stellarium_core.virtio.base import QueueDevice
from stellarium_core.virtio.buffers import ChainTooShort, Reader, Writer
from stellarium_core.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    DeviceLink,
    DeviceState,
    EventLoop,
    HostPathsDevice,
    LinkedDevice,
    QueueEventfds,
    QuiescingDevice,
    StatefulDevice,
    VirtioDevice,
)
from stellarium_core.virtio.memory import GuestMemory, GuestMemoryError, MemoryRegion, RegionMemory
from stellarium_core.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    DescriptorChain,
    Virtqueue,
    VirtqueueError,
)
from stellarium_core.virtio.state import StateError, load_state, unpack_state
from stellarium_core.virtio.timer import Timer

__all__ = [
    "MAX_QUEUE_SIZE", "STATUS_ACKNOWLEDGE", "STATUS_DRIVER", "STATUS_DRIVER_OK",
    "STATUS_FAILED", "STATUS_FEATURES_OK", "STATUS_NEEDS_RESET", "VIRTIO_F_VERSION_1",
    "VIRTIO_RING_F_EVENT_IDX", "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE", "ChainTooShort", "Descriptor", "DescriptorChain", "DeviceLink",
    "DeviceState", "EventLoop", "GuestMemory", "GuestMemoryError", "HostPathsDevice",
    "LinkedDevice",
    "MemoryRegion", "QueueDevice", "QueueEventfds", "QuiescingDevice", "Reader",
    "RegionMemory", "StateError", "StatefulDevice", "Timer", "VirtioDevice", "Writer",
    "Virtqueue", "VirtqueueError", "load_state", "unpack_state",
]
