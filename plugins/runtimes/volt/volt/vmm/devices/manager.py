"""The device manager: virtio devices from the plugin registry, placed on the MMIO bus.

Device ``i`` gets the 4 KiB window at ``MMIO_BASE + i * 4 KiB`` and GSI
``IRQ_BASE + i``; Linux finds it through ``virtio_mmio.device=4K@ADDR:IRQ`` on the
command line. Each queue's notification arrives on an eventfd (a KVM ioeventfd when
KVM has them, so a kick costs the vCPU no exit), served by the I/O thread's loop; the
guest's acknowledgement of a used-ring interrupt is absorbed by KVM the same way, and
its read of InterruptStatus is answered by the vCPU's C run loop (``fast_reads``).
Devices come from the registry by name, never by import, and are closed with the VM.

For a snapshot the manager quiesces every device (kicks and fd events held back, handed-
over queues stopped by their device), saves each transport in attach order, and
restores them into a VM built with the same devices; a snapshot made for another
device set is refused (exit SNAPSHOT) before anything changes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.virtio import QuiescingDevice, StateError, VirtioDevice, unpack_state
from volt.vmm import exitcodes, layout
from volt.vmm.config import DeviceSpec
from volt.vmm.devices.virtio_mmio import (
    INT_VRING,
    INTERRUPT_ACK,
    INTERRUPT_STATUS,
    QUEUE_NOTIFY,
    VirtioMmio,
)
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.vmm.vm import Machine

log = logging.getLogger(__name__)

MAX_DEVICES = layout.IRQ_MAX - layout.IRQ_BASE + 1


def window(index: int) -> tuple[int, int]:
    """(MMIO base, GSI) of device ``index``."""
    return layout.MMIO_BASE + index * layout.MMIO_SIZE, layout.IRQ_BASE + index


def cmdline(count: int) -> str:
    """What the kernel command line needs to find ``count`` virtio-mmio devices."""
    return "".join(f" virtio_mmio.device=4K@{base:#x}:{gsi}"
                   for base, gsi in map(window, range(count)))


def create_devices(specs: Sequence[DeviceSpec], host: Host) -> list[tuple[DeviceSpec, Any]]:
    """Ask the plugin registry for each device; unknown names or params get exit DEVICE.

    Each plugin gets the host (its store and config) through a :class:`DeviceContext`.
    On any failure the devices made so far are closed.
    """
    if len(specs) > MAX_DEVICES:
        raise VoltError(f"at most {MAX_DEVICES} virtio devices, got {len(specs)}",
                        exitcodes.DEVICE)
    context = DeviceContext(host)
    made: list[tuple[DeviceSpec, Any]] = []
    try:
        for spec in specs:
            try:
                dev = host.registry.create("device", spec.plugin, dict(spec.params),
                                           context=context)
            except StellarError as exc:
                raise VoltError(f"device {spec.id} ({spec.plugin}): {exc}",
                                exitcodes.DEVICE) from None
            made.append((spec, dev))
            if not isinstance(dev, VirtioDevice):
                raise VoltError(f"device {spec.id} ({spec.plugin}) does not implement "
                                "VirtioDevice", exitcodes.DEVICE)
    except BaseException:
        close_devices(dev for _spec, dev in made)
        raise
    return made


def close_devices(devices: Any) -> None:
    """Call each device's optional ``close()``; one failing does not stop the others."""
    for dev in devices:
        close = getattr(dev, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception:
            log.exception("closing device %r failed", dev)


class DeviceManager:
    """The VM's virtio devices and their transports."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.transports: dict[str, VirtioMmio] = {}

    def attach(self, device_id: str, device: VirtioDevice) -> VirtioMmio:
        """Put ``device`` on the next MMIO window with its own GSI and kick eventfds."""
        m = self.machine
        index = len(self.transports)
        if index >= MAX_DEVICES:
            raise VoltError(f"at most {MAX_DEVICES} virtio devices", exitcodes.DEVICE)
        base, gsi = window(index)
        kicks = [m.ioeventfd(base + QUEUE_NOTIFY, 4, q) or m.eventfd()
                 for q in range(len(device.queue_sizes))]
        ack = m.ioeventfd(base + INTERRUPT_ACK, 4, INT_VRING)
        try:   # the device's attach runs here, and may ask for what this KVM lacks
            t = VirtioMmio(device, m.mem, m.interrupt(gsi), m.loop, kicks, name=device_id,
                           ack_in_kernel=ack is not None, map_memory=m.map_memory)
        except (RuntimeError, ValueError, StellarError) as exc:
            raise VoltError(f"device {device_id}: {exc}", exitcodes.DEVICE) from None
        m.mmio.add(base, layout.MMIO_SIZE, t)
        m.fast_reads.append((base + INTERRUPT_STATUS, t.isr_cell))
        self.transports[device_id] = t
        return t

    def quiesce(self, timeout: float) -> None:
        """In the I/O thread, with the vCPUs paused: hold back every device's kicks and fd
        events and return once none has a request in flight. Raises VoltError (SNAPSHOT)
        naming a device still busy after ``timeout`` seconds (everything resumed then), or
        one whose queues run outside the VMM and that cannot be quiesced (nothing held)."""
        for ident, t in self.transports.items():
            if t.handed_over and not isinstance(t.device, QuiescingDevice):
                raise VoltError(f"device {ident}: its queues are served outside the VMM "
                                f"({t.kind}) and it cannot be quiesced for a snapshot",
                                exitcodes.SNAPSHOT)
        deadline = time.monotonic() + timeout
        while True:
            busy = [(ident, n) for ident, t in self.transports.items() if (n := t.quiesce())]
            if not busy:
                return
            if time.monotonic() >= deadline:
                self.resume()
                ident, n = busy[0]
                raise VoltError(f"device {ident} still has {n} request(s) in flight after "
                                f"{timeout:g} s; no snapshot taken", exitcodes.SNAPSHOT)
            time.sleep(0.001)

    def resume(self) -> None:
        """Undo :meth:`quiesce`: the devices serve again what arrived meanwhile."""
        for t in self.transports.values():
            t.resume()

    def save(self) -> dict[str, Any]:
        """Every device's transport and device state in attach order, JSON-able; take it
        quiesced."""
        return {"devices": [{"id": ident, "transport": t.save()}
                            for ident, t in self.transports.items()]}

    def restore(self, state: object) -> None:
        """Restore every device from :meth:`save`'s output, before any vCPU runs and after
        the irqchip. Raises VoltError (SNAPSHOT): with nothing changed when the snapshot
        is malformed or was made for another device set (ids, order, device model or
        virtio type); naming the device whose state is corrupt or refused otherwise."""
        try:
            saved = unpack_state(state, "device snapshot", {"devices": list})["devices"]
            entries = [unpack_state(e, f"device snapshot entry {i}",
                                    {"id": str, "transport": dict})
                       for i, e in enumerate(saved)]
        except StateError as exc:
            raise VoltError(f"snapshot: {exc}", exitcodes.SNAPSHOT) from None
        ids = [e["id"] for e in entries]
        if ids != list(self.transports):
            raise VoltError(f"snapshot: made for devices {ids}, this VM has "
                            f"{list(self.transports)}", exitcodes.SNAPSHOT)
        for e in entries:
            t, tr = self.transports[e["id"]], e["transport"]
            was = (tr.get("kind"), tr.get("device_type"))
            if was != (t.kind, t.device.device_id):
                raise VoltError(f"snapshot: device {e['id']} was a {was[0]} (virtio type "
                                f"{was[1]}), here it is a {t.kind} (virtio type "
                                f"{t.device.device_id})", exitcodes.SNAPSHOT)
        for e in entries:
            try:
                self.transports[e["id"]].restore(e["transport"])
            except Exception as exc:
                why = str(exc) if isinstance(exc, ValueError) else \
                    f"{type(exc).__name__}: {exc}"
                raise VoltError(f"snapshot: device {e['id']}: {why}",
                                exitcodes.SNAPSHOT) from None

    def close(self) -> None:
        close_devices(t.device for t in self.transports.values())
        self.transports.clear()
