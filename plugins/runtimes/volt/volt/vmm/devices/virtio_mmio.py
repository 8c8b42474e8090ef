"""The virtio-mmio transport, modern layout (version 2), driving any ``VirtioDevice``.

Registers are served in the vCPU thread that touched them. Device work happens in
the I/O thread only: a queue notification arrives on that queue's kick eventfd
(a KVM ioeventfd, or written here when the guest's MMIO write exits instead), and
the loop calls ``device.notify``. The lifecycle lock serialises status changes
(activation, reset) against a notification being served; the interrupt-status
register has its own small lock, so the guest's interrupt handler never waits for
a drain.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from stellarium_core.virtio import STATUS_DRIVER_OK, DeviceState, GuestMemory, VirtioDevice
from volt.vmm.devices.event_loop import EventLoop

MAGIC = 0x74726976          # "virt"
VERSION = 2
VENDOR_ID = 0x564F4C54      # "VOLT"
INT_VRING, INT_CONFIG = 1, 2

(MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR, DEVICE_FEATURES, DEVICE_FEATURES_SEL,
 DRIVER_FEATURES, DRIVER_FEATURES_SEL, QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY,
 QUEUE_NOTIFY, INTERRUPT_STATUS, INTERRUPT_ACK, STATUS, QUEUE_DESC_LOW, QUEUE_DESC_HIGH,
 QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH,
 CONFIG_GENERATION) = (0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034,
                       0x038, 0x044, 0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094,
                       0x0A0, 0x0A4, 0x0FC)
CONFIG_SPACE = 0x100
_U32 = struct.Struct("<I")


class VirtioMmio:
    """One device behind the virtio-mmio register window (a bus device)."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: Callable[[], None],
                 loop: EventLoop, kick_fds: Sequence[int], name: str = "") -> None:
        self.state = DeviceState(device)
        self.device = device
        self.mem = mem
        self.name = name or type(device).__name__
        self._irq = irq
        self._lock = threading.RLock()           # lifecycle vs. notifications being served
        self._isr_lock = threading.Lock()        # interrupt status (device and vCPU threads)
        self.interrupt_status = 0
        self.features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.kick_fds = list(kick_fds)
        for q, fd in enumerate(self.kick_fds):
            loop.add(fd, lambda _ev, q=q: self._kicked(q))

    def signal_used(self) -> None:
        """What the device calls after adding used buffers."""
        with self._isr_lock:
            self.interrupt_status |= INT_VRING
        self._irq()

    def _queue(self):  # -> Virtqueue | None
        qs = self.state.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _kicked(self, queue: int) -> None:
        """The I/O thread saw queue ``queue``'s kick eventfd."""
        try:
            os.eventfd_read(self.kick_fds[queue])
        except BlockingIOError:
            return
        self.kick(queue)

    def kick(self, queue: int) -> None:
        """Serve queue ``queue`` (called in the I/O thread)."""
        with self._lock:
            if self.state.status & STATUS_DRIVER_OK:
                self.device.notify(queue)

    def read(self, offset: int, size: int) -> bytes:
        if offset >= CONFIG_SPACE:
            return self.device.read_config(offset - CONFIG_SPACE, size)
        if size != 4:
            return b"\0" * size
        q = self._queue()
        if offset == MAGIC_VALUE:
            v = MAGIC
        elif offset == VERSION_REG:
            v = VERSION
        elif offset == DEVICE_ID:
            v = self.device.device_id
        elif offset == VENDOR:
            v = VENDOR_ID
        elif offset == DEVICE_FEATURES:
            v = (self.device.features >> (32 * self.features_sel)) & 0xFFFFFFFF \
                if self.features_sel < 2 else 0
        elif offset == QUEUE_NUM_MAX:
            v = q.max_size if q else 0
        elif offset == QUEUE_READY:
            v = int(q.ready) if q else 0
        elif offset == INTERRUPT_STATUS:
            v = self.interrupt_status
        elif offset == STATUS:
            v = self.state.status
        elif offset == CONFIG_GENERATION:
            v = self.state.config_generation
        else:
            v = 0
        return _U32.pack(v)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE:
            self.device.write_config(offset - CONFIG_SPACE, data)
            return
        if len(data) != 4:
            return
        v = _U32.unpack(data)[0]
        if offset == QUEUE_NOTIFY:
            if v < len(self.kick_fds):            # the I/O thread serves it
                os.eventfd_write(self.kick_fds[v], 1)
        elif offset == INTERRUPT_ACK:
            with self._isr_lock:
                self.interrupt_status &= ~v
        else:
            with self._lock:
                self._write(offset, v)

    def _write(self, offset: int, v: int) -> None:
        q = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.features_sel = v
        elif offset == DRIVER_FEATURES:
            self.state.accept_features(self.driver_features_sel, v)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = v
        elif offset == QUEUE_SEL:
            self.queue_sel = v
        elif offset == STATUS:
            self.state.set_status(v, self.mem, self.signal_used)
            if v == 0:
                with self._isr_lock:
                    self.interrupt_status = 0
                self.queue_sel = self.features_sel = self.driver_features_sel = 0
        elif q is not None and not q.ready or offset == QUEUE_READY:
            self._write_queue(q, offset, v)

    def _write_queue(self, q: Any, offset: int, v: int) -> None:
        if q is None:
            return
        lo, hi = 0xFFFFFFFF, 0xFFFFFFFF << 32
        if offset == QUEUE_NUM:
            q.size = v
        elif offset == QUEUE_READY:
            q.ready = bool(v & 1)
        elif offset == QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & hi) | v
        elif offset == QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & lo) | (v << 32)
        elif offset == QUEUE_DRIVER_LOW:
            q.avail_addr = (q.avail_addr & hi) | v
        elif offset == QUEUE_DRIVER_HIGH:
            q.avail_addr = (q.avail_addr & lo) | (v << 32)
        elif offset == QUEUE_DEVICE_LOW:
            q.used_addr = (q.used_addr & hi) | v
        elif offset == QUEUE_DEVICE_HIGH:
            q.used_addr = (q.used_addr & lo) | (v << 32)
