"""The KVM side of a microVM: VM fd, guest memory slots, irqchip, PIT, buses and vCPUs.

:class:`Machine` is what the builder returns and the runner runs; it is usable with
any guest code (the ioctl-level tests load tiny real-mode guests into it). It owns
no threads: :mod:`volt.vmm.runner` starts them. Every way a VM ends funnels into
:meth:`Machine.stop` (the first caller wins).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Callable

from stellarium_core.nebula.format import align
from volt.vmm import exitcodes, kvm, layout
from volt.vmm.devices.bus import Bus
from volt.vmm.devices.event_loop import EventLoop
from volt.vmm.devices.i8042 import I8042
from volt.vmm.devices.manager import DeviceManager
from volt.vmm.devices.serial import Serial
from volt.vmm.exitcodes import VoltError
from volt.vmm.memory import MMIO_GAP_END, GuestMemory, GuestMemoryError
from volt.vmm.vcpu import PauseGate, Vcpu

log = logging.getLogger(__name__)

COM1 = 0x3F8
I8042_PORT = 0x60


class Interrupt:
    """One GSI, pulsed through an irqfd when KVM has them, else through KVM_IRQ_LINE."""

    def __init__(self, vm: kvm.VmFd, gsi: int, fd: int | None) -> None:
        self.gsi, self.fd, self._vm = gsi, fd, vm

    def __call__(self) -> None:
        if self.fd is not None:
            os.eventfd_write(self.fd, 1)
        else:
            self._vm.irq_line(self.gsi, 1)
            self._vm.irq_line(self.gsi, 0)


class DroppedStores:
    """A read-only memory slot on the MMIO bus: KVM turns each guest store into it into
    an exit, which is dropped and counted (the memory stays as it was). Loads never
    exit: KVM serves them from the slot."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if not self.count:
            log.warning("%s: the guest writes to read-only memory (at +%#x); "
                        "its stores are dropped", self.name, offset)
        self.count += 1


class Machine:
    """A KVM VM with its memory, in-kernel irqchip + PIT, PIO/MMIO buses, vCPUs and devices."""

    def __init__(self, mem_bytes: int, vcpus: int = 1, *, hugepages: bool = False,
                 ksm: bool = False, kvm_path: str = "/dev/kvm",
                 memory: GuestMemory | None = None) -> None:
        """``memory``: RAM already made (a snapshot's, :meth:`GuestMemory.mapped`); the
        machine owns it from here, and closes it when its creation fails too."""
        try:
            self.kvm = kvm.Kvm(kvm_path)
        except OSError as exc:
            if memory is not None:
                memory.close()
            raise VoltError(f"{kvm_path}: {exc.strerror or exc}", exitcodes.NO_KVM) from None
        self.vm = kvm.VmFd(self.kvm.create_vm())
        self._eventfds: list[int] = []
        self.vm.set_tss_addr(layout.TSS_ADDR)
        try:
            self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        except kvm.KvmError:
            pass      # only VMX uses it
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.has_irqfd = bool(self.kvm.check_extension(kvm.CAP_IRQFD))
        self.has_ioeventfd = bool(self.kvm.check_extension(kvm.CAP_IOEVENTFD))
        try:
            self.mem = memory or GuestMemory(mem_bytes, hugepages=hugepages, ksm=ksm)
        except GuestMemoryError as exc:
            raise VoltError(str(exc), exitcodes.MEMORY) from None
        self.dirty_logging = False
        self._set_ram_slots()
        self._next_slot = len(self.mem.regions)
        self._device_memory = align(max(self.mem.regions[-1].end, MMIO_GAP_END),
                                     layout.DEVICE_MEMORY_ALIGN)
        #: Read-only slots' dropped stores, by name: the metrics writer reports them.
        self.dropped_stores: dict[str, DroppedStores] = {}
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        #: MMIO reads the vCPUs answer in C: (address, cell) pairs (kvm.FastReads).
        self.fast_reads: list[tuple[int, object]] = []
        self.loop = EventLoop()
        self.devices = DeviceManager(self)
        self.gate = PauseGate()
        mmap_size = self.kvm.vcpu_mmap_size()
        self.vcpus = [Vcpu(self, i, kvm.VcpuFd(self.vm.create_vcpu(i), mmap_size))
                      for i in range(vcpus)]
        #: Threads the runner started (vCPUs and the I/O thread); close() waits for them.
        self.threads: list[threading.Thread] = []
        self.stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.first_run: float | None = None
        self.boot_mode = ""
        self.serial: Serial | None = None
        self.i8042: I8042 | None = None
        #: Called first in every thread the VM starts, with its kind (volt.jail confines).
        self.enter_thread: Callable[[str], None] = lambda kind: None

    # -- interrupts and notifications ------------------------------------------------------

    def eventfd(self) -> int:
        """A non-blocking eventfd that lives as long as the machine."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(efd)
        return efd

    def interrupt(self, gsi: int) -> Interrupt:
        """The trigger for ``gsi``: an irqfd when KVM has them."""
        fd = None
        if self.has_irqfd:
            fd = self.eventfd()
            self.vm.irqfd(fd, gsi)
        return Interrupt(self.vm, gsi, fd)

    def ioeventfd(self, addr: int, length: int, datamatch: int) -> int | None:
        """An eventfd KVM signals when the guest writes ``datamatch`` to MMIO ``addr``, with
        no exit to userspace; None when KVM cannot."""
        if not self.has_ioeventfd:
            return None
        efd = self.eventfd()
        try:
            self.vm.ioeventfd(efd, addr, length, datamatch)
        except kvm.KvmError:
            return None
        return efd

    def _set_ram_slots(self) -> None:
        flags = kvm.MEM_LOG_DIRTY_PAGES if self.dirty_logging else 0
        for slot, r in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, r.guest_addr, r.size, r.host_addr, flags)

    def dirty_pages(self) -> list[tuple[int, bytes]] | None:
        """(flat offset, KVM dirty bitmap) of each RAM slot: the pages vCPUs wrote since
        the last call (reading clears them); None until :meth:`log_dirty_pages` turned
        logging on. Devices' writes are not in it (they do not go through KVM)."""
        if not self.dirty_logging:
            return None
        out, flat = [], 0
        for slot, r in enumerate(self.mem.regions):
            out.append((flat, self.vm.get_dirty_log(slot, r.size // mmap.PAGESIZE)))
            flat += r.size
        return out

    def log_dirty_pages(self) -> None:
        """Start KVM's dirty log of guest RAM now (or clear it when on)."""
        if self.dirty_logging:
            self.dirty_pages()
            return
        self.dirty_logging = True
        self._set_ram_slots()

    def map_memory(self, name: str, host_addr: int, size: int, readonly: bool) -> int:
        """Give host memory its own slot above RAM; its guest-physical address (see
        :meth:`stellarium_core.virtio.DeviceLink.map_memory`)."""
        if size <= 0 or size % mmap.PAGESIZE or host_addr % mmap.PAGESIZE:
            raise ValueError(f"{name}: device memory must be whole pages, got {size} "
                             f"bytes at {host_addr:#x}")
        flags = 0
        if readonly:
            if not self.kvm.check_extension(kvm.CAP_READONLY_MEM):
                raise RuntimeError("this KVM has no read-only memory slots "
                                   "(KVM_CAP_READONLY_MEM)")
            flags = kvm.MEM_READONLY
        guest = self._device_memory
        self.vm.set_user_memory_region(self._next_slot, guest, size, host_addr, flags)
        self._next_slot += 1
        self._device_memory = align(guest + size, layout.DEVICE_MEMORY_ALIGN)
        if readonly:
            self.dropped_stores[name] = DroppedStores(name)
            self.mmio.add(guest, size, self.dropped_stores[name])
        return guest

    # -- lifecycle ------------------------------------------------------------------------

    def stop(self, code: int, reason: str) -> None:
        """End the VM with ``code`` (first caller wins): wake the I/O thread, kick every vCPU."""
        with self._stop_lock:
            if self.exit_code is None:
                self.exit_code, self.exit_reason = code, reason
        self.stopped.set()
        self.gate.release_all()
        self.loop.stop()
        for v in self.vcpus:
            v.kick()

    def mark_first_run(self) -> None:
        if self.first_run is None:
            self.first_run = time.monotonic()

    def close(self) -> None:
        """Close the devices (flushing their data) once the I/O thread is gone; release fds
        and memory unless a thread still uses them (then the process exit cleans up)."""
        alive = [t for t in self.threads if t.is_alive()]
        if not any(t.name == "io" for t in alive):
            self.devices.close()
        if alive:
            return
        for v in self.vcpus:
            v.fd.close()
        for efd in self._eventfds:
            os.close(efd)
        self._eventfds.clear()
        self.loop.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()

    # -- standard PC devices ---------------------------------------------------------------

    def add_legacy_devices(self, serial_sink: Callable[[bytes], None]) -> Serial:
        """COM1 on IRQ 4 and the i8042 keyboard on IRQ 1, whose reset line ends the VM."""
        serial = Serial(serial_sink, self.interrupt(layout.SERIAL_IRQ))
        self.pio.add(COM1, 8, serial)
        self.i8042 = I8042(lambda: self.stop(exitcodes.OK, "guest reset"),
                           self.interrupt(layout.KEYBOARD_IRQ))
        self.pio.add(I8042_PORT, 5, self.i8042)
        self.serial = serial
        return serial
