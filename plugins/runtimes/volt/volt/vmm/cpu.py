"""Per-vCPU architectural setup: CPUID template, MSRs, FPU, LAPIC, boot registers.

A Linux guest needs more than registers: without LINT0=ExtINT/LINT1=NMI on the
LAPIC, sane MSRs and FPU state, and the KVM paravirt CPUID leaves with the TSC
frequency, it stalls in early boot (TSC calibration). The CPUID template starts
from what KVM supports and normalizes topology and identity per vCPU.
"""

from __future__ import annotations

import struct

from volt.vmm import kvm, layout
from volt.vmm.memory import GuestMemory

# -- CPUID ------------------------------------------------------------------------

KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_CPUID_TSC_FREQ = 0x40000010   # eax = TSC kHz, ebx = APIC bus kHz (KVM's bus: 1 GHz)
APIC_BUS_KHZ = 1_000_000
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_EDX_HTT = 1 << 28
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1

#: The CPU template: features hidden from the guest as (leaf, subleaf, register, mask).
#: They need host support a microVM cannot promise across hosts, or are not useful in one.
TEMPLATE_CLEAR: tuple[tuple[int, int, str, int], ...] = (
    (0x1, 0, "ecx", (1 << 3) | (1 << 5)),          # MONITOR/MWAIT, VMX
    (0x7, 0, "ecx", 1 << 5),                       # WAITPKG (UMWAIT/TPAUSE)
    (0x80000001, 0, "ecx", 1 << 2),                # SVM (no nested virtualization)
)


def normalize_cpuid(supported: list[kvm.CpuidEntry2], index: int, ncpus: int,
                    tsc_khz: int | None, tsc_deadline: bool = False) -> list[kvm.CpuidEntry2]:
    """KVM's supported CPUID, made into what vCPU ``index`` of ``ncpus`` should see.

    ``tsc_deadline``: KVM emulates the LAPIC TSC-deadline timer (it is not listed in
    the supported CPUID); offering it spares the guest calibrating the LAPIC timer.
    """
    out = [kvm.CpuidEntry2.from_buffer_copy(e) for e in supported]
    for e in out:
        for leaf, sub, reg, mask in TEMPLATE_CLEAR:
            if e.function == leaf and e.index == sub:
                setattr(e, reg, getattr(e, reg) & ~mask)
        if e.function == 0x1:
            # APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
            e.ebx = (index << 24) | (ncpus << 16) | (8 << 8) | (e.ebx & 0xFF)
            e.ecx |= LEAF1_ECX_HYPERVISOR | (LEAF1_ECX_TSC_DEADLINE if tsc_deadline else 0)
            e.edx = e.edx | LEAF1_EDX_HTT if ncpus > 1 else e.edx & ~LEAF1_EDX_HTT
        elif e.function == 0x4:
            # Cache topology: one core per vCPU, caches private except the last level.
            e.eax = (e.eax & 0x3FF) | ((ncpus - 1) << 26)
        elif e.function in (0xB, 0x1F):
            e.edx = index
            level = e.index
            if level == 0:
                e.eax, e.ebx, e.ecx = 0, 1, (1 << 8) | level
            elif level == 1:
                e.eax, e.ebx, e.ecx = max(1, (ncpus - 1).bit_length()), ncpus, (2 << 8) | level
            else:
                e.eax, e.ebx, e.ecx = 0, 0, level
        elif e.function == 0x80000008:
            e.ecx = (e.ecx & ~0xFF) | (ncpus - 1)
        elif e.function == KVM_CPUID_SIGNATURE:
            e.eax = KVM_CPUID_TSC_FREQ if tsc_khz else KVM_CPUID_FEATURES
            e.ebx, e.ecx, e.edx = struct.unpack("<III", b"KVMKVMKVM\0\0\0")
    if tsc_khz:
        out = [e for e in out if e.function != KVM_CPUID_TSC_FREQ]
        leaf = kvm.CpuidEntry2(function=KVM_CPUID_TSC_FREQ, eax=tsc_khz, ebx=APIC_BUS_KHZ)
        out.append(leaf)
    return out


# -- MSRs -------------------------------------------------------------------------

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6

BOOT_MSRS: dict[int, int] = {
    MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_MEM_TYPE_WB,
}


def setup_msrs(vcpu: kvm.VcpuFd) -> None:
    """Reset-time MSRs; KVM returns how many it took, all must be.

    The TSC is left alone: KVM keeps the TSCs of vCPUs created together in sync,
    and writing it per vCPU at different moments makes Linux distrust the TSC.
    """
    n = vcpu.set_msrs(BOOT_MSRS)
    if n != len(BOOT_MSRS):
        bad = list(BOOT_MSRS)[n]
        raise kvm.KvmError(0, f"KVM_SET_MSRS: KVM rejected MSR {bad:#x}")


# -- FPU and LAPIC ----------------------------------------------------------------


def setup_fpu(vcpu: kvm.VcpuFd) -> None:
    """x87 control word and MXCSR as after FNINIT/reset (all exceptions masked)."""
    fpu = kvm.Fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def setup_lapic(vcpu: kvm.VcpuFd) -> None:
    """LINT0 as ExtINT (the 8259 path) and LINT1 as NMI, like a PC BIOS leaves them."""
    state = vcpu.get_lapic()
    raw = bytearray(bytes(state.regs))
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        reg = struct.unpack_from("<I", raw, off)[0]
        struct.pack_into("<I", raw, off, _set_delivery_mode(reg, mode))
    state.regs[:] = raw
    vcpu.set_lapic(state)


# -- registers for the two boot entries --------------------------------------------

X86_CR0_PE = 0x1
X86_CR0_ET = 0x10
X86_CR0_PG = 0x8000_0000
X86_CR4_PAE = 0x20
EFER_LME = 0x100
EFER_LMA = 0x400


def gdt_entry(flags: int, base: int, limit: int) -> int:
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40)
            | ((limit & 0xF0000) << 32) | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


def segment_from_gdt(entry: int, index: int) -> kvm.Segment:
    limit = ((entry >> 32) & 0xF0000) | (entry & 0xFFFF)
    g = (entry >> 55) & 1
    return kvm.Segment(
        base=((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000),
        limit=(limit << 12) | 0xFFF if g else limit,
        selector=index * 8, type=(entry >> 40) & 0xF, present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3, db=(entry >> 54) & 1, s=(entry >> 44) & 1,
        l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1, unusable=0 if (entry >> 47) & 1 else 1)


GDT_64 = (0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF),
          gdt_entry(0x808B, 0, 0xFFFFF))
GDT_32 = (0, gdt_entry(0xC09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF),
          gdt_entry(0x008B, 0, 0x67))


def _load_segments(mem: GuestMemory, sregs: kvm.Sregs, gdt: tuple[int, ...]) -> None:
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write_u64(layout.IDT_ADDR, 0)
    sregs.gdt.base, sregs.gdt.limit = layout.GDT_ADDR, len(gdt) * 8 - 1
    sregs.idt.base, sregs.idt.limit = layout.IDT_ADDR, 7
    code, data, tss = (segment_from_gdt(gdt[i], i) for i in (1, 2, 3))
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss


def write_identity_page_tables(mem: GuestMemory) -> None:
    """Identity map of the first 1 GiB with 2 MiB pages (PML4 -> PDPT -> PD)."""
    mem.write_u64(layout.PML4_ADDR, layout.PDPTE_ADDR | 0x3)
    mem.write_u64(layout.PDPTE_ADDR, layout.PDE_ADDR | 0x3)
    mem.write(layout.PDE_ADDR, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


def setup_long_mode(vcpu: kvm.VcpuFd, mem: GuestMemory, entry: int) -> None:
    """64-bit entry: paging on with identity tables, RSI = zero page."""
    sregs = vcpu.get_sregs()
    _load_segments(mem, sregs, GDT_64)
    write_identity_page_tables(mem)
    sregs.cr3 = layout.PML4_ADDR
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm.Regs(rflags=0x2, rip=entry, rsp=layout.BOOT_STACK,
                           rbp=layout.BOOT_STACK, rsi=layout.ZERO_PAGE_ADDR))


def setup_pvh(vcpu: kvm.VcpuFd, mem: GuestMemory, entry: int, start_info: int) -> None:
    """PVH entry: flat 32-bit protected mode, paging off, EBX = hvm_start_info."""
    sregs = vcpu.get_sregs()
    _load_segments(mem, sregs, GDT_32)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    vcpu.set_regs(kvm.Regs(rflags=0x2, rip=entry, rbx=start_info))


def configure_vcpu(vcpu: kvm.VcpuFd, cpuid: list[kvm.CpuidEntry2]) -> None:
    """What every vCPU gets, boot processor or not."""
    vcpu.set_cpuid2(cpuid)
    setup_msrs(vcpu)
    setup_fpu(vcpu)
    setup_lapic(vcpu)
