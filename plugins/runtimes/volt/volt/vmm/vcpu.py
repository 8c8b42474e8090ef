"""One thread per vCPU: the KVM_RUN loop and what each exit means.

``fcntl.ioctl(KVM_RUN)`` releases the GIL, so vCPUs run in parallel. Port and MMIO
exits are dispatched to the machine's buses; shutdown, reset, triple fault and
KVM errors end the VM through :meth:`Machine.stop` with their own exit code.
"""

from __future__ import annotations

import errno
import signal
import threading
from collections import Counter
from typing import TYPE_CHECKING

from volt.vmm import exitcodes, kvm
from volt.vmm.exitcodes import VoltError
from volt.vmm.signals import KICK_SIGNAL, block_in_this_thread

if TYPE_CHECKING:
    from volt.vmm.vm import Machine

X86_EFLAGS_IF = 0x200


class PauseGate:
    """Where vCPU threads park while the VM is paused."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.paused = False
        self.parked = 0
        self._released = False

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def release_all(self) -> None:
        """The VM is ending: nobody parks any more."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def park(self) -> None:
        """Called by a vCPU thread outside KVM_RUN; returns when resumed or released."""
        with self._cond:
            self.parked += 1
            self._cond.notify_all()
            while self.paused and not self._released:
                self._cond.wait()
            self.parked -= 1

    def wait_parked(self, count: int, timeout: float) -> bool:
        """True once ``count`` vCPUs are parked (or the VM is ending) within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self.parked >= count or self._released, timeout)


class Vcpu:
    """A vCPU fd and the thread that runs it."""

    def __init__(self, machine: Machine, index: int, fd: kvm.VcpuFd) -> None:
        self.machine, self.index, self.fd = machine, index, fd
        self.thread: threading.Thread | None = None
        #: Set by the runner's poweroff probe; the next kick records ``dead`` and clears it.
        self.probe = False
        self.dead = False
        #: Exits to userspace by kind (io, mmio_read, mmio_write, or KVM's exit name).
        self.exits: Counter[str] = Counter()

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}",
                                       daemon=True)
        self.thread.start()
        return self.thread

    def kick(self) -> None:
        """Make KVM_RUN return now (or right away next time it is entered)."""
        run = getattr(self.fd, "run_struct", None)
        if run is None:
            return            # closed (a SIGTERM while the VM shuts down): nothing runs
        run.immediate_exit = 1
        t = self.thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def _thread_main(self) -> None:
        """The vCPU thread; it confines itself before the first KVM_RUN of this vCPU."""
        block_in_this_thread(kick=True)
        m = self.machine
        m.enter_thread("vcpu")
        try:
            self._loop(m)
        except VoltError as exc:
            m.stop(exc.exit_code, str(exc))
        except Exception as exc:  # a VMM bug: end the VM, keep the message
            m.stop(exitcodes.FAILED, f"vcpu{self.index}: {type(exc).__name__}: {exc}")

    def _loop(self, m: Machine) -> None:
        run, gate = self.fd.run_struct, m.gate
        fast = kvm.FastReads(m.fast_reads)
        while not m.stopped.is_set():
            if gate.paused:
                gate.park()
                continue
            m.mark_first_run()
            try:
                reason = self.fd.run(fast)
                self.exits["mmio_read_in_c"] = fast.answered[0]
            except InterruptedError:
                run.immediate_exit = 0
                if self.probe:
                    self.dead, self.probe = self._dead_halted(), False
                continue
            except kvm.KvmError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                # KVM could not fault in a page of guest memory: a file mapped into the
                # guest (a virtio-pmem base's pack) lost it, e.g. was truncated under us.
                raise VoltError(f"vcpu{self.index}: guest memory is gone from under the VM "
                                "(KVM_RUN: EFAULT): a file mapped into the guest was "
                                "truncated or removed", exitcodes.GUEST_ERROR) from None
            if reason is not None:
                self._handle_exit(reason)

    def _dead_halted(self) -> bool:
        """In HLT with interrupts disabled: only an NMI could ever wake this vCPU."""
        return (self.fd.get_mp_state() == kvm.MP_STATE_HALTED
                and not self.fd.get_regs().rflags & X86_EFLAGS_IF)

    def _handle_exit(self, reason: int) -> None:
        m, i, run = self.machine, self.index, self.fd.run_struct
        if reason == kvm.EXIT_IO:
            self.exits["io"] += 1
            io = run.exit.io
            size, count = io.size, io.count
            buf = self.fd.io_data(size * count)
            if io.direction == kvm.IO_OUT:
                for k in range(count):
                    m.pio.write(io.port, bytes(buf[k * size:(k + 1) * size]))
            else:
                for k in range(count):
                    buf[k * size:(k + 1) * size] = m.pio.read(io.port, size)
            return
        if reason == kvm.EXIT_MMIO:
            mm = run.exit.mmio
            self.exits["mmio_write" if mm.is_write else "mmio_read"] += 1
            if mm.is_write:
                m.mmio.write(mm.phys_addr, bytes(mm.data[:mm.len]))
            else:
                data = m.mmio.read(mm.phys_addr, mm.len)
                for k in range(mm.len):
                    mm.data[k] = data[k]
            return
        self.exits[kvm.EXIT_NAMES.get(reason, str(reason)).lower()] += 1
        if reason == kvm.EXIT_SHUTDOWN:
            rip = self.fd.get_regs().rip
            m.stop(exitcodes.TRIPLE_FAULT, f"guest triple fault on vcpu{i} (rip {rip:#x})")
        elif reason == kvm.EXIT_SYSTEM_EVENT:
            kind = run.exit.system_event.type
            if kind in (kvm.SYSTEM_EVENT_SHUTDOWN, kvm.SYSTEM_EVENT_RESET):
                what = "powered off" if kind == kvm.SYSTEM_EVENT_SHUTDOWN else "reset"
                m.stop(exitcodes.OK, f"guest {what}")
            else:
                m.stop(exitcodes.GUEST_ERROR, f"guest system event {kind} (crash)")
        elif reason == kvm.EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            data = " ".join(f"{ie.data[k]:#x}" for k in range(min(ie.ndata, 4)))
            m.stop(exitcodes.GUEST_ERROR,
                   f"KVM internal error on vcpu{i}: suberror {ie.suberror} {data}".strip())
        elif reason == kvm.EXIT_FAIL_ENTRY:
            m.stop(exitcodes.GUEST_ERROR, f"KVM could not enter vcpu{i}: hardware reason "
                   f"{run.exit.fail_entry.hardware_entry_failure_reason:#x}")
        elif reason == kvm.EXIT_HLT:
            m.stop(exitcodes.OK, f"vcpu{i} halted")
        elif reason == kvm.EXIT_INTR:
            run.immediate_exit = 0
        else:
            name = kvm.EXIT_NAMES.get(reason, str(reason))
            m.stop(exitcodes.GUEST_ERROR, f"unexpected KVM exit {name} on vcpu{i}")
