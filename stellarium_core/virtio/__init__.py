"""The virtio device-model contract: split virtqueues over guest memory, features, config.

Device plugins implement :class:`VirtioDevice` and see guest memory only through
:class:`GuestMemory` and queues only as :class:`Virtqueue`. A VMM transport
(Volt's virtio-mmio) owns the registers, tells the device when the driver is
ready and when a queue was kicked, and hands it a callable raising the interrupt.
Nothing here knows about KVM or any particular VMM.
"""

from stellarium_core.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    DeviceState,
    VirtioDevice,
)
from stellarium_core.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    DescriptorChain,
    GuestMemory,
    Virtqueue,
    VirtqueueError,
)

__all__ = [
    "MAX_QUEUE_SIZE", "STATUS_ACKNOWLEDGE", "STATUS_DRIVER", "STATUS_DRIVER_OK",
    "STATUS_FAILED", "STATUS_FEATURES_OK", "STATUS_NEEDS_RESET", "VIRTIO_F_VERSION_1",
    "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "Descriptor",
    "DescriptorChain", "DeviceState", "GuestMemory", "VirtioDevice", "Virtqueue",
    "VirtqueueError",
]
