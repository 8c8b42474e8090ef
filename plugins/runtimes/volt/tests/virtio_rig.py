"""A virtio-mmio test rig: transports on an MMIO bus with the I/O thread's loop running,
a driver that does what Linux's virtio_mmio does, and a plain echo device."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from volt.vmm.devices import virtio_mmio as vm
from volt.vmm.devices.bus import Bus
from volt.vmm.devices.event_loop import EventLoop
from volt.vmm.memory import GuestMemory

from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VirtioDevice,
)

BASE = 0xD0000000
QSIZE = 16
#: Per device slot: descriptor table, available ring, used ring, data.
RING = 0x10000


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


class PlainEcho:
    """A device written to today's VirtioDevice Protocol only: no attach, no close."""

    device_id = 0x7F
    features = VIRTIO_F_VERSION_1
    queue_sizes = (QSIZE,)

    def __init__(self) -> None:
        self.ctx: tuple | None = None
        self.notified = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return b"ECHOCONF"[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features, mem, queues, interrupt) -> None:
        self.ctx = (mem, queues, interrupt)

    def notify(self, queue: int) -> None:
        self.notified += 1
        mem, queues, interrupt = self.ctx
        q = queues[queue]
        for chain in q.drain(mem):
            q.add_used(mem, chain.head, chain.write_all(mem, chain.read_all(mem)))
        if q.wants_interrupt(mem):
            interrupt()

    def reset(self) -> None:
        self.ctx = None


class Irq:
    """Counts pulses; ``fd`` stands for the irqfd KVM would have."""

    def __init__(self, fd: int | None) -> None:
        self.fd, self.count = fd, 0

    def __call__(self) -> None:
        self.count += 1


class Rig:
    """Transports on an MMIO bus with the I/O thread running, and a driver for each."""

    def __init__(self) -> None:
        self.mem = GuestMemory(4 << 20)
        self.bus = Bus("mmio")
        self.loop = EventLoop()
        self.fds: list[int] = []
        self.transports: list[vm.VirtioMmio] = []
        self.irqs: list[Irq] = []
        self.io = threading.Thread(target=self.loop.run, daemon=True)
        self.io.start()

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def start(self, device: VirtioDevice, features: int = VIRTIO_F_VERSION_1) -> Driver:
        """Plug ``device`` in and bring it up as the guest's driver would."""
        drv = self.plug(device)
        drv.init(features)
        return drv

    def plug(self, device: VirtioDevice, irqfd: bool = True) -> Driver:
        i = len(self.transports)
        irq = Irq(self.eventfd() if irqfd else None)
        t = vm.VirtioMmio(device, self.mem, irq, self.loop,
                          [self.eventfd() for _ in device.queue_sizes], name=f"dev{i}")
        self.bus.add(BASE + i * 0x1000, 0x1000, t)
        self.transports.append(t)
        self.irqs.append(irq)
        return Driver(self, i)

    def close(self) -> None:
        self.loop.stop()
        self.io.join(10)
        self.loop.close()
        for fd in self.fds:
            os.close(fd)
        self.mem.close()


class Driver:
    """What Linux's virtio_mmio + a simple driver do for one device."""

    def __init__(self, rig: Rig, index: int) -> None:
        self.rig, self.base = rig, BASE + index * 0x1000
        self.desc = RING * (index + 1)
        self.avail, self.used, self.data = self.desc + 0x1000, self.desc + 0x2000, \
            self.desc + 0x4000
        self.avail_idx = 0
        self.transport = rig.transports[index]
        self.irq = rig.irqs[index]

    def r32(self, off: int) -> int:
        v = struct.unpack("<I", self.rig.bus.read(self.base + off, 4))[0]
        if off == vm.INTERRUPT_STATUS:      # what the vCPU's C loop would answer: the same
            assert self.transport.isr_cell[0] == v, (self.transport.isr_cell[0], v)
        return v

    def w32(self, off: int, v: int) -> None:
        self.rig.bus.write(self.base + off, struct.pack("<I", v))

    def init(self, features: int = VIRTIO_F_VERSION_1) -> None:
        self.w32(vm.STATUS, 0)
        self.rig.mem.write(self.desc, bytes(0x3000))      # fresh rings, as Linux allocates
        self.w32(vm.STATUS, 1 | 2)
        for word in (0, 1):
            self.w32(vm.DRIVER_FEATURES_SEL, word)
            self.w32(vm.DRIVER_FEATURES, (features >> (32 * word)) & 0xFFFFFFFF)
        self.w32(vm.STATUS, 1 | 2 | 8)
        self.w32(vm.QUEUE_SEL, 0)
        self.w32(vm.QUEUE_NUM, QSIZE)
        for reg, addr in ((vm.QUEUE_DESC_LOW, self.desc), (vm.QUEUE_DRIVER_LOW, self.avail),
                          (vm.QUEUE_DEVICE_LOW, self.used)):
            self.w32(reg, addr)
            self.w32(reg + 4, 0)
        self.w32(vm.QUEUE_READY, 1)
        self.w32(vm.STATUS, 1 | 2 | 8 | 4)
        self.avail_idx = 0

    def offer(self, payload: bytes, kick: bool = True) -> None:
        """One echo request: ``payload`` out, as many bytes back."""
        mem, slot = self.rig.mem, self.avail_idx % QSIZE
        d = 2 * slot
        src, dst = self.data + 0x100 * d, self.data + 0x100 * (d + 1)
        mem.write(src, payload)
        mem.write(self.desc + 16 * d, struct.pack("<QIHH", src, len(payload),
                                                  VIRTQ_DESC_F_NEXT, d + 1))
        mem.write(self.desc + 16 * (d + 1), struct.pack("<QIHH", dst, 0x100,
                                                        VIRTQ_DESC_F_WRITE, 0))
        mem.write(self.avail + 4 + 2 * slot, struct.pack("<H", d))
        self.avail_idx += 1
        mem.write(self.avail + 2, struct.pack("<H", self.avail_idx & 0xFFFF))
        if kick:
            self.w32(vm.QUEUE_NOTIFY, 0)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.rig.mem.read(self.used + 2, 2))[0]

    def reply(self, n: int) -> bytes:
        """The bytes the device wrote back for request ``n``."""
        d = 2 * (n % QSIZE)
        _, written = struct.unpack("<II", self.rig.mem.read(self.used + 4 + 8 * (n % QSIZE),
                                                            8))
        return self.rig.mem.read(self.data + 0x100 * (d + 1), written)
