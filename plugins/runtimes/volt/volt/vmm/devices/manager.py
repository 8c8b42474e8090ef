"""The device manager: virtio devices from the plugin registry, placed on the MMIO bus.

Device ``i`` gets the 4 KiB window at ``MMIO_BASE + i * 4 KiB`` and GSI
``IRQ_BASE + i``; Linux finds it through ``virtio_mmio.device=4K@ADDR:IRQ`` on the
command line. Each queue's notification arrives on an eventfd (a KVM ioeventfd when
KVM has them, so a kick costs the vCPU no exit), served by the I/O thread's loop; the
guest's acknowledgement of a used-ring interrupt is absorbed by KVM the same way, and
its read of InterruptStatus is answered by the vCPU's C run loop (``fast_reads``).
Devices come from the registry by name, never by import, and are closed with the VM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from stellarium_core.errors import StellarError
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.virtio import VirtioDevice
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

    def close(self) -> None:
        close_devices(t.device for t in self.transports.values())
        self.transports.clear()
