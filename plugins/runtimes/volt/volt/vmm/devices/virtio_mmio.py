"""The virtio-mmio transport, modern layout (version 2), driving any ``VirtioDevice``.

Registers are served in the vCPU thread that touched them. Device work happens in
the I/O thread: a queue notification arrives on that queue's kick eventfd (a KVM
ioeventfd, or written here when the guest's MMIO write exits instead) and the loop
calls ``device.notify``. The lifecycle lock serialises status changes (activation,
reset) against a notification being served; the interrupt-status register has its
own small lock, so the guest's interrupt handler never waits for a drain.

Interrupts cost the guest one exit, not two: where KVM has ioeventfds the guest's
acknowledgement of a used-ring interrupt (INTERRUPT_ACK = 1, what Linux writes back
after reading the status) is absorbed by KVM, and the used-ring bit of
InterruptStatus reads as always set, so Linux's handler looks at its rings on every
interrupt (a spurious look is cheap; an interrupt is only raised for a reason).

The transport is also the device's :class:`~stellarium_core.virtio.DeviceLink`:
fds it registers run under a guard, and a device that raises (in ``notify``,
``activate`` or an fd callback) is marked NEEDS_RESET with a logged reason, while
the VM and the other devices carry on. A queue handed over as eventfds needs that permanent
used-ring bit too: the backend's irqfd interrupts the guest directly.

For snapshots, :meth:`VirtioMmio.quiesce` stops delivering kicks and fd events to the
device (masked in epoll, so nothing is lost: they are delivered after
:meth:`VirtioMmio.resume`); :meth:`VirtioMmio.save` gives the registers, the device's
negotiation and queue state and its own state (a :class:`StatefulDevice`) as a JSON-able
dict, and :meth:`VirtioMmio.restore` puts a newly made transport and device into it
without the guest, then kicks every ready queue once, so work the snapshot caught
half-way (buffers made available, a throttled request) is picked up when the I/O
thread runs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from stellarium_core.virtio import (
    STATUS_NEEDS_RESET,
    DeviceState,
    GuestMemory,
    QueueEventfds,
    QuiescingDevice,
    StateError,
    StatefulDevice,
    VirtioDevice,
    unpack_state,
)
from volt.vmm._vcpurun import ffi
from volt.vmm.devices.event_loop import EventLoop

log = logging.getLogger(__name__)

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


class DeviceEvents:
    """The event loop as one device sees it: its callbacks run guarded, its fds are its own."""

    def __init__(self, loop: EventLoop, fail: Callable[[str], None]) -> None:
        self._loop, self._fail = loop, fail
        #: The device's fds and the events it watches each for.
        self.fds: dict[int, int] = {}
        #: While paused every fd is watched for nothing (its events wait in the kernel).
        self.paused = False

    def add(self, fd: int, callback: Callable[[int], None],
            events: int = select.EPOLLIN) -> None:
        def guarded(ev: int) -> None:
            try:
                callback(ev)
            except Exception as exc:
                self.remove(fd)
                self._fail(f"callback for fd {fd} raised {type(exc).__name__}: {exc}")
        self._loop.add(fd, guarded, 0 if self.paused else events)
        self.fds[fd] = events

    def modify(self, fd: int, events: int) -> None:
        if not self.paused:
            self._loop.modify(fd, events)
        elif fd not in self.fds:
            raise ValueError(f"fd {fd} is not registered with the event loop")
        self.fds[fd] = events

    def remove(self, fd: int) -> None:
        self._loop.remove(fd)
        self.fds.pop(fd, None)

    def pause(self, on: bool) -> None:
        """Stop (or restart) delivering this device's fd events."""
        if on != self.paused:
            self.paused = on
            for fd, events in self.fds.items():
                self._loop.modify(fd, 0 if on else events)


class VirtioMmio:
    """One device behind the virtio-mmio register window (a bus device), and its link."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: Callable[[], None],
                 loop: EventLoop, kick_fds: Sequence[int], name: str = "",
                 ack_in_kernel: bool = False,
                 map_memory: Callable[[str, int, int, bool], int] | None = None) -> None:
        """``irq`` pulses the device's interrupt; its ``fd`` attribute, when there is one,
        is the irqfd a handed-over queue's backend writes. ``ack_in_kernel``: KVM absorbs
        the guest's INTERRUPT_ACK of the used-ring bit (an ioeventfd on it).
        ``map_memory(name, addr, size, readonly)`` gives host memory a guest-physical
        range (the machine's), for :meth:`map_memory`."""
        self.state = DeviceState(device)
        self.device = device
        self.mem = mem
        self.name = name or type(device).__name__
        self._irq = irq
        self._lock = threading.RLock()           # lifecycle vs. notifications being served
        self._isr_lock = threading.Lock()        # interrupt status (device and vCPU threads)
        self.interrupt_status = 0
        #: Interrupt-status bits that stay set: INT_VRING when KVM absorbs its ACK or a
        #: queue is handed over.
        self.sticky_status = INT_VRING if ack_in_kernel else 0
        #: What a read of InterruptStatus returns, where the vCPU's C run loop reads it
        #: (kvm.FastReads): kept current under the ISR lock by :meth:`_set_isr`.
        self.isr_cell = ffi.new("uint32_t *", self.sticky_status)
        self.features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self.kick_fds = list(kick_fds)
        self.handed_over: set[int] = set()
        self._loop = loop
        self._events = DeviceEvents(loop, self.needs_reset)
        self._map_memory = map_memory
        for q, fd in enumerate(self.kick_fds):
            loop.add(fd, lambda _ev, q=q: self._kicked(q))
        attach = getattr(device, "attach", None)
        if attach is not None:
            attach(self)

    # -- the DeviceLink the device gets ----------------------------------------------------

    @property
    def loop(self) -> DeviceEvents:
        return self._events

    def signal_used(self) -> None:
        """What the device calls after adding used buffers (``activate``'s ``interrupt``)."""
        with self._isr_lock:
            self._set_isr(self.interrupt_status | INT_VRING)
        self._irq()

    def _set_isr(self, status: int) -> None:
        """Under the ISR lock: the interrupt status, and the cell the vCPU loop reads."""
        self.interrupt_status = status
        self.isr_cell[0] = status | self.sticky_status

    def config_changed(self) -> None:
        with self._lock:
            self.state.config_changed()
        self._config_interrupt()

    def needs_reset(self, reason: str) -> None:
        """The device gives up until the driver resets it; its notifications stop."""
        log.error("device %s needs a reset: %s", self.name, reason)
        with self._lock:
            self.state.needs_reset()
        self._config_interrupt()

    def _config_interrupt(self) -> None:
        with self._isr_lock:
            self._set_isr(self.interrupt_status | INT_CONFIG)
        self._irq()

    def queue_eventfds(self, queue: int) -> QueueEventfds:
        if not 0 <= queue < len(self.kick_fds):
            raise ValueError(f"device {self.name} has no queue {queue}")
        call = getattr(self._irq, "fd", None)
        if call is None:
            raise RuntimeError("KVM has no irqfd here, so a backend cannot interrupt the "
                               "guest by itself")
        with self._lock:
            if queue not in self.handed_over:
                self._loop.remove(self.kick_fds[queue])
                self.handed_over.add(queue)
            with self._isr_lock:
                self.sticky_status |= INT_VRING
                self._set_isr(self.interrupt_status)
        return QueueEventfds(self.kick_fds[queue], call)

    def map_memory(self, addr: int, size: int, readonly: bool) -> int:
        if self._map_memory is None:
            raise RuntimeError("this transport has no machine to map device memory into")
        return self._map_memory(self.name, addr, size, readonly)

    # -- snapshots ----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The device model's class, by module and name: what a snapshot's state is for."""
        cls = type(self.device)
        return f"{cls.__module__}.{cls.__qualname__}"

    def quiesce(self) -> int:
        """Stop delivering kicks and fd events to the device (I/O thread); returns how many
        requests it still has in flight (a :class:`QuiescingDevice` may have some)."""
        with self._lock:
            if not self._events.paused:
                self._events.pause(True)
                for q, fd in enumerate(self.kick_fds):
                    if q not in self.handed_over:
                        self._loop.modify(fd, 0)
            if isinstance(self.device, QuiescingDevice):
                return self.device.quiesce()
            return 0

    def resume(self) -> None:
        """Undo :meth:`quiesce`: what arrived meanwhile is delivered now."""
        with self._lock:
            if not self._events.paused:
                return
            if isinstance(self.device, QuiescingDevice):
                self.device.resume()
            for q, fd in enumerate(self.kick_fds):
                if q not in self.handed_over:
                    self._loop.modify(fd, select.EPOLLIN)
            self._events.pause(False)

    def save(self) -> dict[str, Any]:
        """Everything that defines this device to the guest, JSON-able: registers, the
        negotiation and queue state, and the device's own state (base64) when it is a
        :class:`StatefulDevice`. Take it quiesced, so no request is half-served."""
        with self._lock:
            blob = None
            if isinstance(self.device, StatefulDevice):
                blob = base64.b64encode(self.device.save_state()).decode()
            with self._isr_lock:
                isr = self.interrupt_status
            return {"kind": self.kind, "device_type": self.device.device_id,
                    "features_sel": self.features_sel,
                    "driver_features_sel": self.driver_features_sel,
                    "queue_sel": self.queue_sel, "interrupt_status": isr,
                    "state": self.state.save(), "device_state": blob}

    def restore(self, state: object) -> None:
        """Put this transport and its device into a state :meth:`save` made, without the
        guest's involvement: before any vCPU runs, and after the irqchip's state (the
        device may raise its interrupt). Untrusted input: anything malformed, or made for
        another kind of device, raises :class:`StateError` before anything changes; what
        the device's ``activate`` or ``restore_state`` raises is raised."""
        u32 = (0, 0xFFFFFFFF)
        s = unpack_state(state, "virtio-mmio transport", {
            "kind": str, "device_type": u32, "features_sel": u32,
            "driver_features_sel": u32, "queue_sel": u32,
            "interrupt_status": (0, INT_VRING | INT_CONFIG), "state": dict,
            "device_state": (str, type(None))})
        if (s["kind"], s["device_type"]) != (self.kind, self.device.device_id):
            raise StateError(f"saved for a {s['kind']} (virtio type {s['device_type']}), "
                             f"this is a {self.kind} (virtio type {self.device.device_id})")
        blob = None
        if s["device_state"] is not None:
            try:
                blob = base64.b64decode(s["device_state"], validate=True)
            except binascii.Error:
                raise StateError("device_state is not base64") from None
            if not isinstance(self.device, StatefulDevice):
                raise StateError(f"the snapshot holds state of its own for {self.kind}, "
                                 "and this device cannot take it (no restore_state)")
        with self._lock:
            if self.state.status:
                self.state.reset()
            self.state.restore(s["state"], self.mem, self.signal_used)
            self.features_sel, self.queue_sel = s["features_sel"], s["queue_sel"]
            self.driver_features_sel = s["driver_features_sel"]
            with self._isr_lock:
                self._set_isr(s["interrupt_status"])
            if blob is not None:
                self.device.restore_state(blob)        # type: ignore[attr-defined]
            if self.state.live:
                for q, queue in enumerate(self.state.queues):
                    if queue.ready:
                        os.eventfd_write(self.kick_fds[q], 1)

    # -- notifications (I/O thread) --------------------------------------------------------

    def _kicked(self, queue: int) -> None:
        """The I/O thread saw queue ``queue``'s kick eventfd."""
        try:
            os.eventfd_read(self.kick_fds[queue])
        except BlockingIOError:
            return
        self.kick(queue)

    def kick(self, queue: int) -> None:
        """Serve queue ``queue`` unless the device waits for a reset."""
        with self._lock:
            if not self.state.live:
                return
            try:
                self.device.notify(queue)
            except Exception as exc:
                self.needs_reset(f"notify({queue}) raised {type(exc).__name__}: {exc}")

    # -- registers (vCPU threads) ----------------------------------------------------------

    def _queue(self) -> Any:
        qs = self.state.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

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
            v = self.interrupt_status | self.sticky_status
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
            if v < len(self.kick_fds):            # the I/O thread (or a backend) serves it
                os.eventfd_write(self.kick_fds[v], 1)
        elif offset == INTERRUPT_ACK:
            with self._isr_lock:
                self._set_isr(self.interrupt_status & ~v)
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
            self._set_status(v)
        elif q is not None and not q.ready or offset == QUEUE_READY:
            self._write_queue(q, offset, v)

    def _set_status(self, v: int) -> None:
        failed_before = self.state.status & STATUS_NEEDS_RESET
        try:
            self.state.set_status(v, self.mem, self.signal_used)
        except Exception as exc:
            self.needs_reset(f"activate raised {type(exc).__name__}: {exc}")
            return
        if v == 0:
            with self._isr_lock:
                self._set_isr(0)
            self.queue_sel = self.features_sel = self.driver_features_sel = 0
        elif self.state.status & STATUS_NEEDS_RESET and not failed_before:
            log.error("device %s needs a reset: the driver's rings are unusable", self.name)
            self._config_interrupt()

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
