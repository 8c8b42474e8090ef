"""Save and restore of a paused VM's state for snapshots: vCPUs, irqchip, PIT, clock
(and, in their own functions, devices).

KVM keeps most of a running VM's state in the kernel: every vCPU's registers, FPU,
MSRs, local APIC and pending events, and the VM's PICs, IOAPIC, PIT and kvmclock.
A snapshot must take all of it out and put it back into a fresh VM, in an order KVM
accepts, on a CPU that runs the guest the same way. Here each item is the raw bytes
of its ``<linux/kvm.h>`` struct, so the snapshot format needs no schema for them;
restoring checks each blob's presence and size and names what is wrong
(:data:`~volt.vmm.exitcodes.SNAPSHOT`) before KVM sees it.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Iterable, Mapping
from typing import TypeVar

from volt.vmm import exitcodes, kvm
from volt.vmm.exitcodes import VoltError

# -- vCPUs ----------------------------------------------------------------------------------

#: One saved MSR in the ``msrs`` blob: index (u32), value (u64), little-endian.
MSR_PAIR = struct.Struct("<IQ")
#: CPUID leaf 1 ECX: the guest may use XSAVE (and so has state beyond x87/SSE).
LEAF1_ECX_XSAVE = 1 << 26

S = TypeVar("S", bound=ctypes.Structure)


def _read_msrs(fd: kvm.VcpuFd, indices: Iterable[int]) -> dict[int, int]:
    """The MSRs of ``indices`` this vCPU can read, with their values.

    KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it did;
    that one is dropped and the rest asked again.
    """
    todo = list(dict.fromkeys(indices))
    values: dict[int, int] = {}
    while todo:
        got = fd.get_msrs(todo)
        values.update(got)
        todo = todo[len(got) + 1:]
    return values


def msr_indices(k: kvm.Kvm) -> list[int]:
    """The MSRs to save: KVM_GET_MSR_INDEX_LIST, less those a vCPU cannot read.

    Probed once on a scratch VM with KVM's supported CPUID (so call it where creating
    a VM is allowed, e.g. before confinement); :func:`save_vcpu` skips any that the
    real vCPU still refuses.
    """
    vm = kvm.VmFd(k.create_vm())
    try:
        vm.create_irqchip()
        vcpu = kvm.VcpuFd(vm.create_vcpu(0), k.vcpu_mmap_size())
        try:
            vcpu.set_cpuid2(k.supported_cpuid())
            return list(_read_msrs(vcpu, k.msr_index_list()))
        finally:
            vcpu.close()
    finally:
        vm.close()


def _cpuid_entries(blob: bytes, what: str) -> list[kvm.CpuidEntry2]:
    """The entries of a saved ``struct kvm_cpuid2``; VoltError when its size is wrong."""
    head, entry = ctypes.sizeof(kvm.Cpuid2Header), ctypes.sizeof(kvm.CpuidEntry2)
    nent = kvm.Cpuid2Header.from_buffer_copy(blob).nent if len(blob) >= head else -1
    if nent < 0 or len(blob) != head + nent * entry:
        expected = f"{head} + {entry} per entry ({nent} entries)" if nent >= 0 else f">= {head}"
        raise VoltError(f"snapshot {what} 'cpuid' is {len(blob)} bytes, expected {expected}",
                        exitcodes.SNAPSHOT)
    return [kvm.CpuidEntry2.from_buffer_copy(blob, head + i * entry) for i in range(nent)]


def _cpuid_blob(entries: list[kvm.CpuidEntry2]) -> bytes:
    buf, _head, arr = kvm.cpuid_buffer(len(entries))
    for i, e in enumerate(entries):
        arr[i] = e
    return bytes(buf)


def _has_xsave(entries: list[kvm.CpuidEntry2]) -> bool:
    return any(e.function == 1 and e.ecx & LEAF1_ECX_XSAVE for e in entries)


def _finish_pending_exit(fd: kvm.VcpuFd) -> None:
    """Let KVM complete the instruction of the last exit (a port read's data lands in the
    register only on the next KVM_RUN) without running the guest further: KVM_RUN with
    immediate_exit, as the KVM API documentation prescribes before saving state."""
    fd.run_struct.immediate_exit = 1
    try:
        reason = fd.run()
    except InterruptedError:
        return
    finally:
        fd.run_struct.immediate_exit = 0
    if reason is not None:
        name = kvm.EXIT_NAMES.get(reason, str(reason))
        raise VoltError(f"cannot save a vCPU with an unhandled exit ({name})")


def save_vcpu(fd: kvm.VcpuFd, msrs: list[int]) -> dict[str, bytes]:
    """A paused vCPU's state as raw KVM structs: cpuid, mp_state, regs, sregs, xsave (or
    fpu), xcrs, debugregs, lapic, msrs (``MSR_PAIR`` records) and vcpu_events.

    The vCPU must be paused (its thread parked outside KVM_RUN); the exit its thread
    handled last is completed first. ``msrs`` comes from :func:`msr_indices`. The FPU
    is saved in XSAVE layout; only when KVM has no KVM_GET_XSAVE (EINVAL/ENOTTY: Linux
    before 2.6.36) and the guest cannot use XSAVE (its CPUID says so) is the legacy
    ``kvm_fpu`` kept instead, which then holds all the x87/SSE state such a guest has.
    """
    _finish_pending_exit(fd)
    cpuid = fd.get_cpuid2()
    state = {"cpuid": _cpuid_blob(cpuid), "mp_state": bytes(kvm.MpState(fd.get_mp_state())),
             "regs": bytes(fd.get_regs()), "sregs": bytes(fd.get_sregs())}
    try:
        state["xsave"] = bytes(fd.get_xsave())
    except kvm.KvmError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY) or _has_xsave(cpuid):
            raise
        state["fpu"] = bytes(fd.get_fpu())
    state["xcrs"] = bytes(fd.get_xcrs())
    state["debugregs"] = bytes(fd.get_debugregs())
    state["lapic"] = bytes(fd.get_lapic())
    state["msrs"] = b"".join(MSR_PAIR.pack(i, v) for i, v in _read_msrs(fd, msrs).items())
    state["vcpu_events"] = bytes(fd.get_vcpu_events())
    return state


def _blob(state: Mapping[str, bytes], key: str, what: str) -> bytes:
    if key not in state:
        raise VoltError(f"snapshot {what} has no '{key}'", exitcodes.SNAPSHOT)
    return state[key]


def _struct(state: Mapping[str, bytes], key: str, t: type[S], what: str) -> S:
    """The ``t`` saved under ``key``; VoltError when it is missing or of another size."""
    blob = _blob(state, key, what)
    if len(blob) != ctypes.sizeof(t):
        raise VoltError(f"snapshot {what} '{key}' is {len(blob)} bytes, expected "
                        f"{ctypes.sizeof(t)}", exitcodes.SNAPSHOT)
    return t.from_buffer_copy(blob)


def _msr_pairs(blob: bytes) -> dict[int, int]:
    if len(blob) % MSR_PAIR.size:
        raise VoltError(f"snapshot vCPU state 'msrs' is {len(blob)} bytes, expected a "
                        f"multiple of {MSR_PAIR.size}", exitcodes.SNAPSHOT)
    return dict(MSR_PAIR.iter_unpack(blob))


def restore_vcpu(fd: kvm.VcpuFd, state: Mapping[str, bytes]) -> None:
    """Load what :func:`save_vcpu` saved into a fresh (never run) vCPU.

    Order matters to KVM: CPUID first (it decides which MSRs and XSAVE features are
    valid), the LAPIC before the MSRs (the TSC deadline lives in it), pending events
    last. Every blob is checked before anything is set, so a bad snapshot leaves the
    vCPU untouched; VoltError (SNAPSHOT) names the item and its expected size.
    """
    what = "vCPU state"
    cpuid = _cpuid_entries(_blob(state, "cpuid", what), what)
    mp_state = _struct(state, "mp_state", kvm.MpState, what)
    regs = _struct(state, "regs", kvm.Regs, what)
    sregs = _struct(state, "sregs", kvm.Sregs, what)
    fpu = _struct(state, "fpu", kvm.Fpu, what) if "xsave" not in state and "fpu" in state \
        else None
    xsave = b""
    if fpu is None:
        xsave = _blob(state, "xsave", what)
        if len(xsave) != kvm.XSAVE_SIZE:
            raise VoltError(f"snapshot {what} 'xsave' is {len(xsave)} bytes, expected "
                            f"{kvm.XSAVE_SIZE}", exitcodes.SNAPSHOT)
    xcrs = _struct(state, "xcrs", kvm.Xcrs, what)
    debugregs = _struct(state, "debugregs", kvm.DebugRegs, what)
    lapic = _struct(state, "lapic", kvm.LapicState, what)
    msrs = _msr_pairs(_blob(state, "msrs", what))
    events = _struct(state, "vcpu_events", kvm.VcpuEvents, what)

    fd.set_cpuid2(cpuid)
    fd.set_mp_state(mp_state.mp_state)
    fd.set_regs(regs)
    fd.set_sregs(sregs)
    if fpu is None:
        fd.set_xsave(xsave)
    else:
        fd.set_fpu(fpu)
    fd.set_xcrs(xcrs)
    fd.set_debugregs(debugregs)
    fd.set_lapic(lapic)
    done = fd.set_msrs(msrs)
    if done < len(msrs):
        index = list(msrs)[done]
        raise VoltError(f"KVM refused to restore MSR {index:#x} (KVM_SET_MSRS set {done} of "
                        f"{len(msrs)}): the snapshot's CPU differs from this one",
                        exitcodes.SNAPSHOT)
    fd.set_vcpu_events(events)
    fd.kvmclock_ctrl()        # the guest was stopped: spare it soft-lockup warnings


# -- CPU model ------------------------------------------------------------------------------


def _signature(entries: Iterable[kvm.CpuidEntry2]) -> str:
    leaves = {e.function: e for e in entries if e.index == 0}
    if 0 not in leaves or 1 not in leaves:
        raise VoltError("snapshot vCPU 'cpuid' lacks leaf 0 or 1: its CPU model is unknown",
                        exitcodes.SNAPSHOT)
    v = leaves[0]
    vendor = struct.pack("<III", v.ebx, v.edx, v.ecx).decode("ascii", "replace")
    eax = leaves[1].eax
    family, model, stepping = (eax >> 8) & 0xF, (eax >> 4) & 0xF, eax & 0xF
    if family == 0xF:
        family += (eax >> 20) & 0xFF
    if family >= 6:
        model |= ((eax >> 16) & 0xF) << 4
    return f"{vendor} family {family} model {model} stepping {stepping}"


def cpu_signature(cpuid: bytes) -> str:
    """"Vendor family F model M stepping S" of a saved vCPU's CPUID (leaves 0 and 1)."""
    return _signature(_cpuid_entries(cpuid, "vCPU state"))


def check_cpu(k: kvm.Kvm, saved_cpuid: bytes) -> None:
    """VoltError (SNAPSHOT) unless the snapshot's CPU model is this host's: a guest
    paused on one model may run on another with features or MSRs it lacks."""
    saved, here = cpu_signature(saved_cpuid), _signature(k.supported_cpuid())
    if saved != here:
        raise VoltError(f"the snapshot was taken on a {saved} CPU; this host has a {here}",
                        exitcodes.SNAPSHOT)


# -- the VM: irqchip, PIT, clock ------------------------------------------------------------

_CHIPS = {"pic_master": kvm.IRQCHIP_PIC_MASTER, "pic_slave": kvm.IRQCHIP_PIC_SLAVE,
          "ioapic": kvm.IRQCHIP_IOAPIC}


def save_vm(vm: kvm.VmFd) -> dict[str, bytes]:
    """The in-kernel devices of a paused VM as raw KVM structs: pic_master, pic_slave,
    ioapic (``kvm_irqchip``), pit2 (``kvm_pit_state2``) and clock (``kvm_clock_data``)."""
    state = {key: bytes(vm.get_irqchip(chip)) for key, chip in _CHIPS.items()}
    state["pit2"] = bytes(vm.get_pit2())
    state["clock"] = bytes(vm.get_clock())
    return state


def restore_vm(vm: kvm.VmFd, state: Mapping[str, bytes]) -> None:
    """Load what :func:`save_vm` saved into a fresh VM with an irqchip and a PIT.

    kvmclock restarts at exactly the saved value: the flags are cleared, since
    KVM_CLOCK_REALTIME would advance it by the time the snapshot sat on disk and
    KVM_CLOCK_HOST_TSC refers to the old host's TSC.
    """
    what = "VM state"
    chips = []
    for key, chip_id in _CHIPS.items():
        chip = _struct(state, key, kvm.Irqchip, what)
        if chip.chip_id != chip_id:
            raise VoltError(f"snapshot {what} '{key}' holds irqchip {chip.chip_id}, "
                            f"expected {chip_id}", exitcodes.SNAPSHOT)
        chips.append(chip)
    pit = _struct(state, "pit2", kvm.PitState2, what)
    clock = _struct(state, "clock", kvm.ClockData, what)
    for chip in chips:
        vm.set_irqchip(chip)
    vm.set_pit2(pit)
    vm.set_clock(kvm.ClockData(clock=clock.clock))
