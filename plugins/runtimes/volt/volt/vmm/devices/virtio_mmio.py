"""The virtio-mmio transport, modern layout (version 2), driving any ``VirtioDevice``.

Each device gets a 4 KiB MMIO window and its own GSI; Linux finds it through
``virtio_mmio.device=4K@ADDR:IRQ`` on the command line. Used-buffer interrupts
set bit 0 of InterruptStatus and pulse the GSI (through an irqfd when KVM has
them). Devices come from the plugin registry by name, never by import.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from typing import Any

from stellarium_core.errors import StellarError
from stellarium_core.virtio import STATUS_DRIVER_OK, DeviceState, GuestMemory, VirtioDevice
from volt.vmm import exitcodes, layout
from volt.vmm.exitcodes import VoltError

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


class VirtioMmio:
    """One device behind the virtio-mmio register window (a bus device)."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: Callable[[], None]) -> None:
        self.state = DeviceState(device)
        self.device = device
        self.mem = mem
        self._irq = irq
        self._lock = threading.Lock()            # interrupt status (device threads)
        self._regs = threading.RLock()           # registers vs. ioeventfd kicks
        self.interrupt_status = 0
        self.features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0

    def signal_used(self) -> None:
        """What the device calls after adding used buffers."""
        with self._lock:
            self.interrupt_status |= INT_VRING
        self._irq()

    def _queue(self):  # -> Virtqueue | None
        qs = self.state.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def kick(self, queue: int) -> None:
        """Queue ``queue`` was notified (from the MMIO write or an ioeventfd)."""
        with self._regs:
            if queue < len(self.state.queues) and self.state.status & STATUS_DRIVER_OK:
                self.device.notify(queue)

    def read(self, offset: int, size: int) -> bytes:
        with self._regs:
            return self._read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._regs:
            self._write(offset, data)

    def _read(self, offset: int, size: int) -> bytes:
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
            with self._lock:
                v = self.interrupt_status
        elif offset == STATUS:
            v = self.state.status
        elif offset == CONFIG_GENERATION:
            v = self.state.config_generation
        else:
            v = 0
        return struct.pack("<I", v)

    def _write(self, offset: int, data: bytes) -> None:
        if offset >= CONFIG_SPACE:
            self.device.write_config(offset - CONFIG_SPACE, data)
            return
        if len(data) != 4:
            return
        v = struct.unpack("<I", data)[0]
        q = self._queue()
        if offset == DEVICE_FEATURES_SEL:
            self.features_sel = v
        elif offset == DRIVER_FEATURES:
            self.state.accept_features(self.driver_features_sel, v)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = v
        elif offset == QUEUE_SEL:
            self.queue_sel = v
        elif offset == QUEUE_NOTIFY:
            self.kick(v)
        elif offset == INTERRUPT_ACK:
            with self._lock:
                self.interrupt_status &= ~v
        elif offset == STATUS:
            self.state.set_status(v, self.mem, self.signal_used)
            if v == 0:
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


def parse_device_option(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[,key=value...]`` from ``--device``; errors carry the DEVICE exit code."""
    name, *pairs = spec.split(",")
    if not name:
        raise VoltError(f"--device {spec!r}: missing device name", exitcodes.DEVICE)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise VoltError(f"--device {spec!r}: {pair!r} is not key=value", exitcodes.DEVICE)
        params[key] = value
    return name, params


def create_devices(specs: list[tuple[str, dict[str, Any]]]) -> list[VirtioDevice]:
    """Ask the plugin registry for each device; unknown names/params get exit DEVICE."""
    if not specs:
        return []
    if len(specs) > layout.IRQ_MAX - layout.IRQ_BASE + 1:
        raise VoltError(f"at most {layout.IRQ_MAX - layout.IRQ_BASE + 1} virtio devices",
                        exitcodes.DEVICE)
    from stellarium_core.plugins import Registry

    registry = Registry()
    devices = []
    for name, params in specs:
        try:
            dev = registry.create("device", name, params)
        except StellarError as exc:
            raise VoltError(f"device {name!r}: {exc}", exitcodes.DEVICE) from None
        if not isinstance(dev, VirtioDevice):
            raise VoltError(f"device {name!r} does not implement VirtioDevice", exitcodes.DEVICE)
        devices.append(dev)
    return devices


def attach_devices(machine: Any, devices: list[VirtioDevice]) -> list[VirtioMmio]:
    """Put each device on the MMIO bus at MMIO_BASE + i * 4 KiB with GSI IRQ_BASE + i.

    Queue notifications go through ioeventfds where KVM has them, so a kick costs
    the vCPU no exit to userspace; otherwise they arrive as MMIO writes.
    """
    out = []
    for i, dev in enumerate(devices):
        base = layout.MMIO_BASE + i * layout.MMIO_SIZE
        t = VirtioMmio(dev, machine.mem, machine.irq_trigger(layout.IRQ_BASE + i))
        machine.mmio.add(base, layout.MMIO_SIZE, t)
        for q in range(len(dev.queue_sizes)):
            machine.on_guest_write(base + QUEUE_NOTIFY, 4, q, lambda q=q, t=t: t.kick(q))
        out.append(t)
    return out
