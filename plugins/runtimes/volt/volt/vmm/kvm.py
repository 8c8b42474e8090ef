"""Thin wrappers over the /dev/kvm ioctl interface: numbers, ctypes structs, fds.

Everything here is a direct mapping of <linux/kvm.h> for x86-64; policy (what to
put in the registers, which CPUID bits to show) lives in :mod:`volt.vmm.cpu`.
``fcntl.ioctl`` with an integer argument releases the GIL, so ``KVM_RUN`` in one
thread does not stop the other vCPU threads.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
from ctypes import c_uint8 as u8
from ctypes import c_uint16 as u16
from ctypes import c_uint32 as u32
from ctypes import c_uint64 as u64
from typing import Any

from volt.vmm._vcpurun import ffi, lib

KVMIO = 0xAE
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, t: type) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(t))


def _ior(nr: int, t: type) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(t))


# -- structs --------------------------------------------------------------------


class UserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
                ("memory_size", u64), ("userspace_addr", u64)]


class Regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class Segment(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8),
                ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class DTable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class Sregs(ctypes.Structure):
    _fields_ = [("cs", Segment), ("ds", Segment), ("es", Segment), ("fs", Segment),
                ("gs", Segment), ("ss", Segment), ("tr", Segment), ("ldt", Segment),
                ("gdt", DTable), ("idt", DTable), ("cr0", u64), ("cr2", u64),
                ("cr3", u64), ("cr4", u64), ("cr8", u64), ("efer", u64),
                ("apic_base", u64), ("interrupt_bitmap", u64 * 4)]


class Fpu(ctypes.Structure):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8),
                ("pad1", u8), ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class MsrEntry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


class MsrList(ctypes.Structure):
    """The head of ``struct kvm_msr_list``; ``nmsrs`` u32 indices follow."""

    _fields_ = [("nmsrs", u32)]


class CpuidEntry2(ctypes.Structure):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32),
                ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class Cpuid2Header(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32)]


class LapicState(ctypes.Structure):
    _fields_ = [("regs", u8 * 1024)]


class IrqLevel(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class PitConfig(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class Irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32),
                ("pad", u8 * 16)]


class Ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


class MpState(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class Xsave(ctypes.Structure):
    """``struct kvm_xsave`` as KVM_GET_XSAVE fills it (KVM_GET_XSAVE2 may write more)."""

    _fields_ = [("region", u32 * 1024)]


class Xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class Xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", Xcr * 16), ("padding", u64 * 16)]


class _EventException(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _EventInterrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _EventNmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _EventSmi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class VcpuEvents(ctypes.Structure):
    _fields_ = [("exception", _EventException), ("interrupt", _EventInterrupt),
                ("nmi", _EventNmi), ("sipi_vector", u32), ("flags", u32), ("smi", _EventSmi),
                ("triple_fault_pending", u8), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class DebugRegs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64),
                ("reserved", u64 * 9)]


class PicState(ctypes.Structure):
    _fields_ = [(n, u8) for n in (
        "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
        "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
        "special_fully_nested_mode", "init4", "elcr", "elcr_mask")]


class IoapicState(ctypes.Structure):
    """``struct kvm_ioapic_state``; each redirection entry as its raw 64 bits."""

    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32),
                ("pad", u32), ("redirtbl", u64 * 24)]


class _IrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", u8 * 512), ("pic", PicState), ("ioapic", IoapicState)]


class Irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _IrqchipUnion)]


class PitChannelState(ctypes.Structure):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8),
                ("write_state", u8), ("write_latch", u8), ("rw_mode", u8), ("mode", u8),
                ("bcd", u8), ("gate", u8), ("count_load_time", ctypes.c_int64)]


class PitState2(ctypes.Structure):
    _fields_ = [("channels", PitChannelState * 3), ("flags", u32), ("reserved", u32 * 9)]


class ClockData(ctypes.Structure):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class DirtyLog(ctypes.Structure):
    """``struct kvm_dirty_log``: a slot and the address of the bitmap KVM fills."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class _RunIo(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _RunMmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _RunInternal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunFailEntry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _RunSystemEvent(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class _RunExit(ctypes.Union):
    _fields_ = [("io", _RunIo), ("mmio", _RunMmio), ("internal", _RunInternal),
                ("fail_entry", _RunFailEntry), ("system_event", _RunSystemEvent),
                ("padding", ctypes.c_char * 256)]


class Run(ctypes.Structure):
    """The head of the shared ``struct kvm_run`` page of a vCPU."""

    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("exit", _RunExit)]


# -- ioctl numbers --------------------------------------------------------------

GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
GET_MSR_INDEX_LIST = _iowr(0x02, MsrList)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
GET_SUPPORTED_CPUID = _iowr(0x05, Cpuid2Header)
CREATE_VCPU = _io(0x41)
GET_DIRTY_LOG = _iow(0x42, DirtyLog)
SET_USER_MEMORY_REGION = _iow(0x46, UserspaceMemoryRegion)
SET_TSS_ADDR = _io(0x47)
SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
CREATE_IRQCHIP = _io(0x60)
IRQ_LINE = _iow(0x61, IrqLevel)
GET_IRQCHIP = _iowr(0x62, Irqchip)
SET_IRQCHIP = _ior(0x63, Irqchip)       # sic: the kernel header declares it _IOR
IRQFD = _iow(0x76, Irqfd)
CREATE_PIT2 = _iow(0x77, PitConfig)
IOEVENTFD = _iow(0x79, Ioeventfd)
SET_CLOCK = _iow(0x7B, ClockData)
GET_CLOCK = _ior(0x7C, ClockData)
RUN = _io(0x80)
GET_REGS = _ior(0x81, Regs)
SET_REGS = _iow(0x82, Regs)
GET_SREGS = _ior(0x83, Sregs)
SET_SREGS = _iow(0x84, Sregs)
GET_MSRS = _iowr(0x88, MsrsHeader)
SET_MSRS = _iow(0x89, MsrsHeader)
GET_FPU = _ior(0x8C, Fpu)
SET_FPU = _iow(0x8D, Fpu)
GET_LAPIC = _ior(0x8E, LapicState)
SET_LAPIC = _iow(0x8F, LapicState)
SET_CPUID2 = _iow(0x90, Cpuid2Header)
GET_CPUID2 = _iowr(0x91, Cpuid2Header)
GET_MP_STATE = _ior(0x98, MpState)
SET_MP_STATE = _iow(0x99, MpState)
GET_VCPU_EVENTS = _ior(0x9F, VcpuEvents)      # vCPU fd
SET_VCPU_EVENTS = _iow(0xA0, VcpuEvents)      # vCPU fd
GET_PIT2 = _ior(0x9F, PitState2)              # VM fd
SET_PIT2 = _iow(0xA0, PitState2)              # VM fd
GET_DEBUGREGS = _ior(0xA1, DebugRegs)
SET_DEBUGREGS = _iow(0xA2, DebugRegs)
GET_TSC_KHZ = _io(0xA3)
GET_XSAVE = _ior(0xA4, Xsave)
SET_XSAVE = _iow(0xA5, Xsave)
GET_XCRS = _ior(0xA6, Xcrs)
SET_XCRS = _iow(0xA7, Xcrs)
KVMCLOCK_CTRL = _io(0xAD)
GET_XSAVE2 = _ior(0xCF, Xsave)
MP_STATE_HALTED = 3

API_VERSION = 12
CAP_IRQCHIP = 0
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_READONLY_MEM = 31
CAP_IRQFD = 32
CAP_PIT2 = 33
CAP_PIT_STATE2 = 35
CAP_IOEVENTFD = 36
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_GET_TSC_KHZ = 61
CAP_TSC_DEADLINE_TIMER = 72
CAP_KVMCLOCK_CTRL = 76
CAP_IMMEDIATE_EXIT = 136
CAP_XSAVE2 = 208

MEM_LOG_DIRTY_PAGES = 1
MEM_READONLY = 2
PIT_SPEAKER_DUMMY = 1
IOEVENTFD_FLAG_DATAMATCH = 1
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
#: KVM_GET_XSAVE's size; KVM_GET_XSAVE2 writes KVM_CAP_XSAVE2's (never less).
XSAVE_SIZE = ctypes.sizeof(Xsave)

EXIT_NAMES = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}
EXIT_IO, EXIT_HLT, EXIT_MMIO, EXIT_SHUTDOWN = 2, 5, 6, 8
EXIT_FAIL_ENTRY, EXIT_INTR, EXIT_INTERNAL_ERROR, EXIT_SYSTEM_EVENT = 9, 10, 17, 24
IO_IN, IO_OUT = 0, 1
SYSTEM_EVENT_SHUTDOWN, SYSTEM_EVENT_RESET, SYSTEM_EVENT_CRASH = 1, 2, 3

#: Upper bound on CPUID entries asked of KVM_GET_SUPPORTED_CPUID.
MAX_CPUID_ENTRIES = 256
#: Room for MSR indices asked of KVM_GET_MSR_INDEX_LIST first (KVM says when it needs more).
MSR_LIST_GUESS = 128


class KvmError(OSError):
    """An ioctl on /dev/kvm or one of its fds failed; names the call."""


def _ioctl(fd: int, request: int, arg: object = 0, what: str = "") -> int:
    try:
        return fcntl.ioctl(fd, request, arg)  # type: ignore[arg-type]
    except OSError as exc:
        reason = os.strerror(exc.errno or 0)
        raise KvmError(exc.errno, f"{what or hex(request)}: {reason}") from None


def cpuid_buffer(n: int) -> tuple[bytearray, Cpuid2Header, ctypes.Array]:
    """A ``kvm_cpuid2`` with room for ``n`` entries, plus typed views into it."""
    buf = bytearray(ctypes.sizeof(Cpuid2Header) + n * ctypes.sizeof(CpuidEntry2))
    head = Cpuid2Header.from_buffer(buf)
    entries = (CpuidEntry2 * n).from_buffer(buf, ctypes.sizeof(Cpuid2Header))
    head.nent = n
    return buf, head, entries


class Kvm:
    """The system fd (/dev/kvm): capabilities, supported CPUID, new VMs."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        version = _ioctl(self.fd, GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != API_VERSION:
            os.close(self.fd)
            raise KvmError(errno.EINVAL, f"KVM API version {version}, expected {API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry2]:
        buf, head, entries = cpuid_buffer(MAX_CPUID_ENTRIES)
        _ioctl(self.fd, GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        return [CpuidEntry2.from_buffer_copy(entries[i]) for i in range(head.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM can save and restore for a guest."""
        n = MSR_LIST_GUESS
        while True:
            buf = bytearray(ctypes.sizeof(MsrList) + 4 * n)
            MsrList.from_buffer(buf).nmsrs = n
            try:
                _ioctl(self.fd, GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            except KvmError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                n = MsrList.from_buffer(buf).nmsrs       # KVM wrote back how many it has
                continue
            count = MsrList.from_buffer(buf).nmsrs
            return list((u32 * count).from_buffer(buf, ctypes.sizeof(MsrList)))

    def create_vm(self) -> int:
        return _ioctl(self.fd, CREATE_VM, 0, "KVM_CREATE_VM")

    def close(self) -> None:
        os.close(self.fd)


class VmFd:
    """One VM: memory slots, irqchip, PIT, interrupt lines, irqfd/ioeventfd."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int,
                               flags: int = 0) -> None:
        region = UserspaceMemoryRegion(slot, flags, guest_addr, size, host_addr)
        _ioctl(self.fd, SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        # fcntl.ioctl passes a C int; the kernel truncates the argument to 32 bits again.
        signed = addr - (1 << 32) if addr >= 1 << 31 else addr
        _ioctl(self.fd, SET_TSS_ADDR, signed, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, SET_IDENTITY_MAP_ADDR, u64(addr), "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, CREATE_PIT2, PitConfig(flags=flags), "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, IRQ_LINE, IrqLevel(irq, level), "KVM_IRQ_LINE")

    def irqfd(self, eventfd: int, gsi: int) -> None:
        _ioctl(self.fd, IRQFD, Irqfd(fd=eventfd, gsi=gsi), "KVM_IRQFD")

    def ioeventfd(self, eventfd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False) -> None:
        flags = (IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) | (2 if pio else 0)
        arg = Ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _ioctl(self.fd, IOEVENTFD, arg, "KVM_IOEVENTFD")

    def create_vcpu(self, index: int) -> int:
        return _ioctl(self.fd, CREATE_VCPU, index, "KVM_CREATE_VCPU")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION asked of this VM (KVM_CAP_XSAVE2's size is per VM)."""
        return _ioctl(self.fd, CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def get_irqchip(self, chip_id: int) -> Irqchip:
        """One in-kernel interrupt controller: IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC."""
        chip = Irqchip(chip_id=chip_id)
        _ioctl(self.fd, GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: Irqchip) -> None:
        _ioctl(self.fd, SET_IRQCHIP, chip, "KVM_SET_IRQCHIP")

    def get_pit2(self) -> PitState2:
        s = PitState2()
        _ioctl(self.fd, GET_PIT2, s, "KVM_GET_PIT2")
        return s

    def set_pit2(self, s: PitState2) -> None:
        _ioctl(self.fd, SET_PIT2, s, "KVM_SET_PIT2")

    def get_clock(self) -> ClockData:
        c = ClockData()
        _ioctl(self.fd, GET_CLOCK, c, "KVM_GET_CLOCK")
        return c

    def set_clock(self, c: ClockData) -> None:
        _ioctl(self.fd, SET_CLOCK, c, "KVM_SET_CLOCK")

    def get_dirty_log(self, slot: int, npages: int) -> bytes:
        """The pages of memory slot ``slot`` (``npages`` long, flagged MEM_LOG_DIRTY_PAGES)
        written since the last call: bit ``i`` of the bitmap (LSB first) is page ``i``."""
        bitmap = ctypes.create_string_buffer((npages + 63) // 64 * 8)   # whole u64 words
        log = DirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self.fd, GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bitmap.raw

    def close(self) -> None:
        os.close(self.fd)


class FastReads:
    """MMIO registers a vCPU answers without leaving C: (guest address, 32-bit cell)
    pairs whose cells their owner keeps current (a transport's InterruptStatus)."""

    NONE: FastReads

    def __init__(self, reads: list[tuple[int, Any]]) -> None:
        self.count = len(reads)
        self.table = ffi.new("struct vr_read[]", max(self.count, 1))
        for i, (addr, cell) in enumerate(reads):
            self.table[i].addr, self.table[i].value = addr, cell
        self._cells = [cell for _, cell in reads]
        self.answered = ffi.new("uint64_t *")


class VcpuFd:
    """One vCPU fd and its mmap'd ``kvm_run`` page."""

    def __init__(self, fd: int, mmap_size: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct = Run.from_buffer(self._map)
        self._page: Any = None          # the kvm_run page for C (taken on the first run)

    def run(self, answer: FastReads | None = None) -> int | None:
        """Enter the guest; returns the exit reason, or None when KVM asks to re-enter.

        ``answer``'s MMIO reads are served in C without returning here (see
        vcpurun.c). An application processor parked before its INIT/SIPI returns
        EAGAIN once woken; a kick (signal or immediate_exit) raises InterruptedError.
        """
        if self._page is None:
            self._page = ffi.from_buffer(self._map)
        answer = answer or FastReads.NONE
        r = lib.vr_run(self.fd, self._page, answer.table, answer.count, answer.answered)
        if r >= 0:
            return r
        if -r == errno.EAGAIN:
            return None
        if -r == errno.EINTR:
            raise InterruptedError(errno.EINTR, "KVM_RUN interrupted")
        raise KvmError(-r, f"KVM_RUN: {os.strerror(-r)}")

    def io_data(self, size: int) -> memoryview:
        """The bytes of the current port I/O exit (inside the kvm_run page)."""
        off = self.run_struct.exit.io.data_offset
        return memoryview(self._map)[off:off + size]

    def get_regs(self) -> Regs:
        r = Regs()
        _ioctl(self.fd, GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: Regs) -> None:
        _ioctl(self.fd, SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        s = Sregs()
        _ioctl(self.fd, GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: Sregs) -> None:
        _ioctl(self.fd, SET_SREGS, s, "KVM_SET_SREGS")

    def get_fpu(self) -> Fpu:
        f = Fpu()
        _ioctl(self.fd, GET_FPU, f, "KVM_GET_FPU")
        return f

    def set_fpu(self, f: Fpu) -> None:
        _ioctl(self.fd, SET_FPU, f, "KVM_SET_FPU")

    def get_lapic(self) -> LapicState:
        s = LapicState()
        _ioctl(self.fd, GET_LAPIC, s, "KVM_GET_LAPIC")
        return s

    def set_lapic(self, s: LapicState) -> None:
        _ioctl(self.fd, SET_LAPIC, s, "KVM_SET_LAPIC")

    def get_cpuid2(self) -> list[CpuidEntry2]:
        """The CPUID table KVM_SET_CPUID2 gave this vCPU."""
        n = MAX_CPUID_ENTRIES
        while True:
            buf, head, entries = cpuid_buffer(n)
            try:
                _ioctl(self.fd, GET_CPUID2, buf, "KVM_GET_CPUID2")
            except KvmError as exc:
                if exc.errno != errno.E2BIG:
                    raise
                n *= 2          # KVM does not say how many it has on E2BIG
                continue
            # Linux 6.1 (the lab's) leaves nent at the buffer's size on success; the
            # tail it did not fill stays zero, and no real entry is all zero: drop it
            empty = bytes(ctypes.sizeof(CpuidEntry2))
            return [CpuidEntry2.from_buffer_copy(entries[i]) for i in range(head.nent)
                    if bytes(entries[i]) != empty]

    def set_cpuid2(self, entries: list[CpuidEntry2]) -> None:
        buf, _head, arr = cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            arr[i] = e
        _ioctl(self.fd, SET_CPUID2, buf, "KVM_SET_CPUID2")

    def set_msrs(self, msrs: dict[int, int]) -> int:
        buf = _msrs_buffer(msrs)
        return _ioctl(self.fd, SET_MSRS, buf, "KVM_SET_MSRS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        buf = _msrs_buffer({i: 0 for i in indices})
        n = _ioctl(self.fd, GET_MSRS, buf, "KVM_GET_MSRS")
        arr = (MsrEntry * len(indices)).from_buffer(buf, ctypes.sizeof(MsrsHeader))
        return {arr[i].index: arr[i].data for i in range(n)}

    def get_mp_state(self) -> int:
        s = MpState()
        _ioctl(self.fd, GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return s.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, SET_MP_STATE, MpState(mp_state), "KVM_SET_MP_STATE")

    def get_xsave(self, size: int = XSAVE_SIZE) -> bytearray:
        """The guest's FPU/SSE/AVX... state in XSAVE layout: KVM_GET_XSAVE, or KVM_GET_XSAVE2
        when ``size`` (KVM_CAP_XSAVE2 on the VM fd) is larger than 4096 bytes."""
        buf = bytearray(max(size, XSAVE_SIZE))
        if size > XSAVE_SIZE:
            _ioctl(self.fd, GET_XSAVE2, buf, "KVM_GET_XSAVE2")
        else:
            _ioctl(self.fd, GET_XSAVE, buf, "KVM_GET_XSAVE")
        return buf

    def set_xsave(self, data: bytes) -> None:
        """KVM_SET_XSAVE; KVM reads KVM_CAP_XSAVE2's size (at least 4096 bytes) of ``data``."""
        if len(data) < XSAVE_SIZE:
            raise ValueError(f"KVM_SET_XSAVE needs at least {XSAVE_SIZE} bytes, got {len(data)}")
        _ioctl(self.fd, SET_XSAVE, bytearray(data), "KVM_SET_XSAVE")

    def get_xcrs(self) -> Xcrs:
        x = Xcrs()
        _ioctl(self.fd, GET_XCRS, x, "KVM_GET_XCRS")
        return x

    def set_xcrs(self, x: Xcrs) -> None:
        _ioctl(self.fd, SET_XCRS, x, "KVM_SET_XCRS")

    def get_vcpu_events(self) -> VcpuEvents:
        e = VcpuEvents()
        _ioctl(self.fd, GET_VCPU_EVENTS, e, "KVM_GET_VCPU_EVENTS")
        return e

    def set_vcpu_events(self, e: VcpuEvents) -> None:
        _ioctl(self.fd, SET_VCPU_EVENTS, e, "KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> DebugRegs:
        d = DebugRegs()
        _ioctl(self.fd, GET_DEBUGREGS, d, "KVM_GET_DEBUGREGS")
        return d

    def set_debugregs(self, d: DebugRegs) -> None:
        _ioctl(self.fd, SET_DEBUGREGS, d, "KVM_SET_DEBUGREGS")

    def kvmclock_ctrl(self) -> bool:
        """Tell the guest's kvmclock it was paused (so its watchdogs do not fire); False
        when the guest has not enabled kvmclock (KVM answers EINVAL)."""
        try:
            _ioctl(self.fd, KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")
        except KvmError as exc:
            if exc.errno != errno.EINVAL:
                raise
            return False
        return True

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def close(self) -> None:
        del self.run_struct
        if self._page is not None:
            ffi.release(self._page)
            self._page = None
        self._map.close()
        os.close(self.fd)


FastReads.NONE = FastReads([])


def _msrs_buffer(msrs: dict[int, int]) -> bytearray:
    buf = bytearray(ctypes.sizeof(MsrsHeader) + len(msrs) * ctypes.sizeof(MsrEntry))
    MsrsHeader.from_buffer(buf).nmsrs = len(msrs)
    arr = (MsrEntry * len(msrs)).from_buffer(buf, ctypes.sizeof(MsrsHeader))
    for i, (index, data) in enumerate(msrs.items()):
        arr[i].index, arr[i].data = index, data
    return buf
