"""A microVM: KVM VM + guest memory + devices + one thread per vCPU.

``Machine`` is the KVM plumbing and the run loop (usable with any guest code,
which the ioctl-level tests rely on); :func:`build` assembles a Linux guest
from a :class:`VmConfig` with the loaders. Every way a VM ends funnels into
``Machine.stop(code, reason)``; the first caller wins.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from volt.vmm import cpu, exitcodes, kvm, layout
from volt.vmm.devices.bus import Bus
from volt.vmm.devices.i8042 import I8042
from volt.vmm.devices.serial import Serial
from volt.vmm.exitcodes import VoltError
from volt.vmm.memory import GuestMemory, GuestMemoryError

#: Signal used to kick a vCPU thread out of KVM_RUN (its handler does nothing).
KICK_SIGNAL = signal.SIGRTMIN
#: How often the main thread checks whether every vCPU is dead-halted (poweroff).
HALT_PROBE_SECONDS = 1.0
X86_EFLAGS_IF = 0x200
#: Signals only the main thread should see.
MAIN_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
COM1 = 0x3F8


@dataclass
class VmConfig:
    """Everything ``volt run`` takes; the API and snapshot work will reuse it."""

    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0 reboot=k panic=-1 pci=off"
    mem_mib: int = 128
    vcpus: int = 1
    hugepages: bool = False
    serial: str = "stdout"            # stdout | file:PATH | unix:PATH | none
    boot: str = "auto"                # auto | linux64 | pvh
    devices: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def open_sink(spec: str) -> Callable[[bytes], None]:
    """Where console output goes: stdout, a file, a unix socket, or nowhere."""
    if spec == "stdout":
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError):      # stdout replaced (embedding, tests)
            return lambda b: print(b.decode(errors="replace"), end="", flush=True)
        return lambda b: _write_all(fd, b)
    if spec == "none":
        return lambda b: None
    kind, _, path = spec.partition(":")
    if kind == "file" and path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VoltError(f"serial file {path}: {exc.strerror}", exitcodes.DEVICE) from None
        return lambda b: _write_all(fd, b)
    if kind == "unix" and path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            raise VoltError(f"serial socket {path}: {exc.strerror}", exitcodes.DEVICE) from None
        return lambda b: _send(s, b)
    raise VoltError(f"serial output {spec!r}: use stdout, none, file:PATH or unix:PATH",
                    exitcodes.DEVICE)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass          # a closed console must not kill the guest


def _send(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass


class Machine:
    """KVM VM with memory, in-kernel irqchip + PIT, PIO/MMIO buses and vCPUs."""

    def __init__(self, mem_bytes: int, vcpus: int = 1, hugepages: bool = False,
                 kvm_path: str = "/dev/kvm") -> None:
        self.t_start = time.monotonic()
        try:
            self.kvm = kvm.Kvm(kvm_path)
        except OSError as exc:
            raise VoltError(f"{kvm_path}: {exc.strerror or exc}", exitcodes.NO_KVM) from None
        self.vm = kvm.VmFd(self.kvm.create_vm())
        self.ncpus = vcpus
        self.vm.set_tss_addr(layout.TSS_ADDR)
        try:
            self.vm.set_identity_map_addr(layout.IDENTITY_MAP_ADDR)
        except kvm.KvmError:
            pass      # only VMX uses it
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.has_irqfd = bool(self.kvm.check_extension(kvm.CAP_IRQFD))
        try:
            self.mem = GuestMemory(mem_bytes, hugepages)
        except GuestMemoryError as exc:
            raise VoltError(str(exc), exitcodes.MEMORY) from None
        for slot, r in enumerate(self.mem.regions):
            self.vm.set_user_memory_region(slot, r.guest_addr, r.size, r.host_addr)
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        mmap_size = self.kvm.vcpu_mmap_size()
        self.vcpus = [kvm.VcpuFd(self.vm.create_vcpu(i), mmap_size) for i in range(vcpus)]
        self._eventfds: list[int] = []
        self._fd_handlers: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.has_ioeventfd = bool(self.kvm.check_extension(kvm.CAP_IOEVENTFD))
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._paused = False
        self._resume = threading.Condition(self._lock)
        self._parked = 0
        self._probe = False
        self._dead = [False] * vcpus
        self.exit_code: int | None = None
        self.exit_reason = ""
        self.first_run: float | None = None
        self.boot_mode = ""
        self.serial: Serial | None = None
        #: Called first in every thread the VM starts, with its kind (volt.jail confines).
        self.enter_thread: Callable[[str], None] = lambda kind: None

    # -- interrupts ---------------------------------------------------------------

    def irq_trigger(self, gsi: int) -> Callable[[], None]:
        """A callable that pulses ``gsi``: through an irqfd when KVM has them."""
        if self.has_irqfd:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.vm.irqfd(efd, gsi)
            self._eventfds.append(efd)
            return lambda: os.eventfd_write(efd, 1)

        def pulse() -> None:
            self.vm.irq_line(gsi, 1)
            self.vm.irq_line(gsi, 0)
        return pulse

    def on_guest_write(self, addr: int, length: int, datamatch: int,
                       handler: Callable[[], None]) -> bool:
        """Run ``handler`` in the I/O thread when the guest writes ``datamatch`` to MMIO
        ``addr``, without a userspace exit (ioeventfd). False when KVM cannot do it."""
        if not self.has_ioeventfd:
            return False
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.ioeventfd(efd, addr, length, datamatch)
        except kvm.KvmError:
            os.close(efd)
            return False
        self._eventfds.append(efd)
        self._fd_handlers[efd] = handler
        return True

    def _io_loop(self) -> None:
        """The I/O thread: dispatches ioeventfd kicks to device handlers."""
        self.enter_thread("io")
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_SIGNALS | {KICK_SIGNAL})
        poller = select.epoll()
        for fd in (*self._fd_handlers, self._wake):
            poller.register(fd, select.EPOLLIN)
        try:
            while not self._stopped.is_set():
                self._dispatch(poller.poll())
            self._dispatch(poller.poll(0))       # kicks that raced with the stop
        except Exception as exc:  # a device bug: end the VM, keep the message
            self.stop(exitcodes.FAILED, f"io thread: {type(exc).__name__}: {exc}")
        finally:
            poller.close()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, _ev in events:
            if fd == self._wake:
                continue
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            self._fd_handlers[fd]()

    # -- lifecycle -----------------------------------------------------------------

    def stop(self, code: int, reason: str) -> None:
        """End the VM with ``code`` (first caller wins) and kick every vCPU out."""
        with self._lock:
            if self.exit_code is None:
                self.exit_code, self.exit_reason = code, reason
            self._resume.notify_all()
        self._stopped.set()
        os.eventfd_write(self._wake, 1)
        self._kick_all()

    def _kick_all(self) -> None:
        for v in self.vcpus:
            v.run_struct.immediate_exit = 1
        for t in self._threads:
            if t.name.startswith("vcpu") and t.ident is not None and t.is_alive():
                try:
                    signal.pthread_kill(t.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def pause(self, timeout: float = 10.0) -> None:
        """Stop all vCPUs outside KVM_RUN; returns once every one is parked."""
        with self._lock:
            self._paused = True
        self._kick_all()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._parked < len(self._alive()) and not self._stopped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VoltError("pause: vCPUs did not stop in time")
                self._resume.wait(min(left, 0.05))

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._resume.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def _alive(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]

    def start(self) -> None:
        """Start one thread per vCPU."""
        signal.signal(KICK_SIGNAL, lambda *_: None)
        for i, v in enumerate(self.vcpus):
            t = threading.Thread(target=self._vcpu_loop, args=(i, v), name=f"vcpu{i}",
                                 daemon=True)
            self._threads.append(t)
        if self._fd_handlers:
            self._threads.append(threading.Thread(target=self._io_loop, name="io", daemon=True))
        for t in reversed(self._threads):        # the I/O thread first
            t.start()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the VM ends (or ``timeout``); returns the exit code or None.

        Meanwhile it probes, once a second, whether every vCPU sits in HLT with
        interrupts off: that is how Linux without ACPI powers off ("System halted"),
        and nothing but an NMI could wake it, so the VM ends with exit code OK.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        dead_probes = 0
        while not self._stopped.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            step = HALT_PROBE_SECONDS if left is None else min(left, HALT_PROBE_SECONDS)
            if self._stopped.wait(step):
                break
            dead_probes = dead_probes + 1 if all(self._dead) else 0
            if dead_probes >= 2:
                self.stop(exitcodes.OK, "guest halted (powered off)")
                break
            self._dead = [False] * len(self.vcpus)
            if not self._paused:
                self._probe = True
                self._kick_all()
        for t in self._threads:
            t.join(5)
        return self.exit_code

    def close(self) -> None:
        for t in self._threads:
            if t.is_alive():
                return          # a vCPU still uses the fds; let process exit clean up
        for v in self.vcpus:
            v.close()
        for efd in (*self._eventfds, self._wake):
            os.close(efd)
        self.vm.close()
        self.kvm.close()
        self.mem.close()

    # -- the vCPU thread -------------------------------------------------------------

    def _vcpu_loop(self, index: int, vcpu: kvm.VcpuFd) -> None:
        self.enter_thread("vcpu")
        signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_SIGNALS)
        run = vcpu.run_struct
        try:
            while not self._stopped.is_set():
                if self._paused:
                    self._park()
                    continue
                if self.first_run is None:
                    self.first_run = time.monotonic()
                try:
                    reason = vcpu.run()
                except InterruptedError:
                    run.immediate_exit = 0
                    if self._probe:
                        self._dead[index] = self._dead_halted(vcpu)
                    continue
                if reason is not None:
                    self._handle_exit(index, vcpu, reason)
        except VoltError as exc:
            self.stop(exc.exit_code, str(exc))
        except Exception as exc:  # a VMM bug: end the VM, keep the message
            self.stop(exitcodes.FAILED, f"vcpu{index}: {type(exc).__name__}: {exc}")

    @staticmethod
    def _dead_halted(vcpu: kvm.VcpuFd) -> bool:
        """In HLT with interrupts disabled: only an NMI could ever wake this vCPU."""
        return (vcpu.get_mp_state() == kvm.MP_STATE_HALTED
                and not vcpu.get_regs().rflags & X86_EFLAGS_IF)

    def _park(self) -> None:
        with self._lock:
            self._parked += 1
            self._resume.notify_all()
            while self._paused and not self._stopped.is_set():
                self._resume.wait()
            self._parked -= 1

    def _handle_exit(self, index: int, vcpu: kvm.VcpuFd, reason: int) -> None:
        run = vcpu.run_struct
        if reason == kvm.EXIT_IO:
            io = run.exit.io
            size, count = io.size, io.count
            buf = vcpu.io_data(size * count)
            if io.direction == kvm.IO_OUT:
                for i in range(count):
                    self.pio.write(io.port, bytes(buf[i * size:(i + 1) * size]))
            else:
                for i in range(count):
                    buf[i * size:(i + 1) * size] = self.pio.read(io.port, size)
        elif reason == kvm.EXIT_MMIO:
            m = run.exit.mmio
            if m.is_write:
                self.mmio.write(m.phys_addr, bytes(m.data[:m.len]))
            else:
                data = self.mmio.read(m.phys_addr, m.len)
                for i in range(m.len):
                    m.data[i] = data[i]
        elif reason == kvm.EXIT_SHUTDOWN:
            rip = vcpu.get_regs().rip
            self.stop(exitcodes.TRIPLE_FAULT, f"guest triple fault on vcpu{index} (rip {rip:#x})")
        elif reason == kvm.EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind in (kvm.SYSTEM_EVENT_SHUTDOWN, kvm.SYSTEM_EVENT_RESET):
                what = "powered off" if kind == kvm.SYSTEM_EVENT_SHUTDOWN else "reset"
                self.stop(exitcodes.OK, f"guest {what}")
            else:
                self.stop(exitcodes.GUEST_ERROR, f"guest system event {kind} (crash)")
        elif reason == kvm.EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 4)))
            self.stop(exitcodes.GUEST_ERROR,
                      f"KVM internal error on vcpu{index}: suberror {ie.suberror} {data}".strip())
        elif reason == kvm.EXIT_FAIL_ENTRY:
            self.stop(exitcodes.GUEST_ERROR, f"KVM could not enter vcpu{index}: hardware reason "
                      f"{run.exit.fail_entry.hardware_entry_failure_reason:#x}")
        elif reason == kvm.EXIT_HLT:
            self.stop(exitcodes.OK, f"vcpu{index} halted")
        elif reason == kvm.EXIT_INTR:
            run.immediate_exit = 0
        else:
            name = kvm.EXIT_NAMES.get(reason, str(reason))
            self.stop(exitcodes.GUEST_ERROR, f"unexpected KVM exit {name} on vcpu{index}")

    # -- standard PC devices ---------------------------------------------------------------

    def add_legacy_devices(self, serial_sink: Callable[[bytes], None]) -> Serial:
        """COM1 on IRQ 4 and the i8042 whose reset line ends the VM."""
        serial = Serial(serial_sink, self.irq_trigger(layout.SERIAL_IRQ))
        self.pio.add(COM1, 8, serial)
        self.pio.add(0x60, 5, I8042(lambda: self.stop(exitcodes.OK, "guest reset")))
        self.serial = serial
        return serial

    def feed_console(self, fd: int) -> None:
        """Forward bytes read from ``fd`` (stdin) to the guest's serial port, in a thread."""
        def pump() -> None:
            self.enter_thread("io")
            while not self._stopped.is_set():
                try:
                    data = os.read(fd, 64)
                except OSError:
                    return
                if not data:
                    return
                while data and not self._stopped.is_set():
                    data = data[self.serial.input(data):]
                    if data:
                        time.sleep(0.01)     # the guest has not drained its FIFO yet
        threading.Thread(target=pump, name="console-in", daemon=True).start()


# -- a Linux guest ---------------------------------------------------------------------

MIN_MEM_MIB = 8
MAX_MEM_MIB = 64 * 1024
MAX_VCPUS = 32


def _check_config(cfg: VmConfig) -> None:
    if not MIN_MEM_MIB <= cfg.mem_mib <= MAX_MEM_MIB:
        raise VoltError(f"--mem {cfg.mem_mib}: guest memory must be {MIN_MEM_MIB}.."
                        f"{MAX_MEM_MIB} MiB", exitcodes.MEMORY)
    if not 1 <= cfg.vcpus <= MAX_VCPUS:
        raise VoltError(f"--vcpus {cfg.vcpus}: must be 1..{MAX_VCPUS}", exitcodes.USAGE)
    if cfg.boot not in ("auto", "linux64", "pvh"):
        raise VoltError(f"--boot {cfg.boot}: use auto, linux64 or pvh", exitcodes.USAGE)


def build(cfg: VmConfig, serial_sink: Callable[[bytes], None] | None = None) -> Machine:
    """Check the config, then create the VM, load the kernel and configure the vCPUs.

    Input errors that need no KVM (kernel file, command line) are found before
    /dev/kvm is opened, so they report the same way on any machine.
    """
    from volt.vmm.devices.virtio_mmio import attach_devices, create_devices
    from volt.vmm.loader import bootparams, mptable
    from volt.vmm.loader import kernel as kernel_loader

    _check_config(cfg)
    image = kernel_loader.open_kernel(cfg.kernel)
    initrd_data = bootparams.read_initrd(cfg.initrd) if cfg.initrd else None
    devices = create_devices(cfg.devices)
    cmdline = cfg.cmdline
    for i, _dev in enumerate(devices):
        cmdline += (f" virtio_mmio.device=4K@{layout.MMIO_BASE + i * layout.MMIO_SIZE:#x}"
                    f":{layout.IRQ_BASE + i}")
    raw_cmdline = bootparams.check_cmdline(cmdline, image.cmdline_limit)
    sink = serial_sink or open_sink(cfg.serial)

    machine = Machine(cfg.mem_mib << 20, cfg.vcpus, cfg.hugepages)
    try:
        mem = machine.mem
        loaded = kernel_loader.load(image, mem)
        initrd = None
        if initrd_data is not None:
            addr = bootparams.place_initrd(mem, initrd_data, loaded.end, image.initrd_addr_max)
            initrd = (addr, len(initrd_data))
        mptable.write(mem, cfg.vcpus)
        machine.add_legacy_devices(sink)
        attach_devices(machine, devices)
        use_pvh = cfg.boot == "pvh" or (cfg.boot == "auto" and loaded.pvh_entry is not None
                                        and loaded.setup_header is None)
        if cfg.boot == "pvh" and loaded.pvh_entry is None:
            raise VoltError(f"{cfg.kernel}: --boot pvh needs a vmlinux with a PVH note",
                            exitcodes.KERNEL)
        supported = machine.kvm.supported_cpuid()
        try:
            tsc_khz = machine.vcpus[0].get_tsc_khz()
        except kvm.KvmError:
            tsc_khz = None
        deadline = bool(machine.kvm.check_extension(kvm.CAP_TSC_DEADLINE_TIMER))
        for i, v in enumerate(machine.vcpus):
            cpu.configure_vcpu(v, cpu.normalize_cpuid(supported, i, cfg.vcpus, tsc_khz,
                                                      deadline))
        boot = machine.vcpus[0]
        if use_pvh:
            info = bootparams.write_pvh_start_info(mem, raw_cmdline, initrd)
            cpu.setup_pvh(boot, mem, loaded.pvh_entry or 0, info)
        else:
            bootparams.write_zero_page(mem, loaded, raw_cmdline, initrd)
            cpu.setup_long_mode(boot, mem, loaded.entry)
        machine.boot_mode = "pvh" if use_pvh else "linux64"
    except BaseException:
        machine.close()
        raise
    return machine
