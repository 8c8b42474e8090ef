"""vhost-net: the host kernel serves the guest's rings, so packets never cross Python.

The device hands each queue over (its kick is the guest's ioeventfd, its call the
device's irqfd, both from ``DeviceLink.queue_eventfds``), tells /dev/vhost-net where
guest memory and the rings are mapped in this process, and makes the tap the backend.
Reset detaches the backend; the next activation sets everything again.

ioctl numbers are those of <linux/vhost.h> (type 0xAF).
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence

from stellarium_core.errors import ConfigError
from stellarium_core.virtio import GuestMemory, QueueEventfds, Virtqueue

VHOST_PATH = "/dev/vhost-net"


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAF << 8) | nr


_W, _R = 1, 2
VHOST_GET_FEATURES = _ioc(_R, 0x00, 8)
VHOST_SET_FEATURES = _ioc(_W, 0x00, 8)
VHOST_SET_OWNER = _ioc(0, 0x01, 0)
VHOST_SET_MEM_TABLE = _ioc(_W, 0x03, 8)
VHOST_SET_VRING_NUM = _ioc(_W, 0x10, 8)
VHOST_SET_VRING_ADDR = _ioc(_W, 0x11, 40)
VHOST_SET_VRING_BASE = _ioc(_W, 0x12, 8)
VHOST_SET_VRING_KICK = _ioc(_W, 0x20, 8)
VHOST_SET_VRING_CALL = _ioc(_W, 0x21, 8)
VHOST_NET_SET_BACKEND = _ioc(_W, 0x30, 8)
#: Every ioctl the device makes after the VMM confined itself (activation and reset).
RUNTIME_IOCTLS = (VHOST_SET_FEATURES, VHOST_SET_MEM_TABLE, VHOST_SET_VRING_NUM,
                  VHOST_SET_VRING_ADDR, VHOST_SET_VRING_BASE, VHOST_SET_VRING_KICK,
                  VHOST_SET_VRING_CALL, VHOST_NET_SET_BACKEND)

_STATE = struct.Struct("<II")             # vhost_vring_state / vhost_vring_file (index, num|fd)
_FILE = struct.Struct("<Ii")
_ADDR = struct.Struct("<IIQQQQ")          # index, flags, desc, used, avail, log
_REGION = struct.Struct("<QQQQ")          # guest_phys_addr, memory_size, userspace_addr, pad


class VhostNet:
    """An owned /dev/vhost-net instance; ``features`` are the virtio bits it can serve."""

    def __init__(self, path: str = VHOST_PATH) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = " (modprobe vhost_net)" if exc.errno == 2 else ""
            raise ConfigError(f"vhost=on: cannot open {path}: {exc.strerror}{hint}",
                              key="vhost") from None
        try:
            fcntl.ioctl(self.fd, VHOST_SET_OWNER)
            buf = bytearray(8)
            fcntl.ioctl(self.fd, VHOST_GET_FEATURES, buf)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"vhost=on: {path} refused us: {exc.strerror}",
                              key="vhost") from None
        self.features = int.from_bytes(buf, "little")
        self.queues = 0

    def start(self, features: int, mem: GuestMemory, queues: Sequence[Virtqueue],
              eventfds: Sequence[QueueEventfds], backend: int) -> None:
        """Serve ``queues`` (already checked against ``mem``) with ``backend`` (a tap fd)."""
        fd = self.fd
        fcntl.ioctl(fd, VHOST_SET_FEATURES, struct.pack("<Q", features & self.features))
        regions = mem.regions
        table = struct.pack("<II", len(regions), 0) + b"".join(
            _REGION.pack(r.guest_addr, r.size, r.host_addr, 0) for r in regions)
        fcntl.ioctl(fd, VHOST_SET_MEM_TABLE, table)
        for i, (q, efds) in enumerate(zip(queues, eventfds, strict=True)):
            fcntl.ioctl(fd, VHOST_SET_VRING_NUM, _STATE.pack(i, q.size))
            fcntl.ioctl(fd, VHOST_SET_VRING_BASE, _STATE.pack(i, q.last_avail))
            fcntl.ioctl(fd, VHOST_SET_VRING_ADDR, _ADDR.pack(
                i, 0, _host(mem, q.desc_addr), _host(mem, q.used_addr),
                _host(mem, q.avail_addr), 0))
            fcntl.ioctl(fd, VHOST_SET_VRING_KICK, _FILE.pack(i, efds.kick))
            fcntl.ioctl(fd, VHOST_SET_VRING_CALL, _FILE.pack(i, efds.call))
            fcntl.ioctl(fd, VHOST_NET_SET_BACKEND, _FILE.pack(i, backend))
        self.queues = len(queues)

    def stop(self) -> None:
        """Detach the backend from every ring (the guest reset the device)."""
        for i in range(self.queues):
            fcntl.ioctl(self.fd, VHOST_NET_SET_BACKEND, _FILE.pack(i, -1))
        self.queues = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _host(mem: GuestMemory, addr: int) -> int:
    """This process's address of guest address ``addr``."""
    for r in mem.regions:
        if r.guest_addr <= addr < r.end:
            return r.host_addr + addr - r.guest_addr
    raise ValueError(f"guest address {addr:#x} is outside guest memory")
