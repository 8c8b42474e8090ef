"""vCPU and VM state save/restore (volt.vmm.persist) on this machine's /dev/kvm."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from volt.vmm import exitcodes, kvm, persist
from volt.vmm.exitcodes import VoltError
from volt.vmm.runner import Runner
from volt.vmm.vm import Machine

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, real_mode_machine  # noqa: E402

pytestmark = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))

MEM = 1 << 20
COUNTER_ADDR = 0x2000
PORT = 0x500           # +0: the register counter, +4: the memory counter (32 bits each)
#: Real mode, 32-bit operands: 1: inc ecx; inc dword [0x2000]; mov eax, ecx;
#: mov dx, 0x500; out dx, eax; mov eax, [0x2000]; mov dx, 0x504; out dx, eax; jmp 1b
COUNTER = (bytes.fromhex("6641" "66ff060020" "6689c8" "ba0005" "66ef" "66a10020" "ba0405"
                         "66ef") + b"\xeb")
COUNTER += bytes([(-(len(COUNTER) + 1)) & 0xFF])


class Ports:
    """Records the values the guest writes to PORT (+0) and PORT + 4."""

    def __init__(self) -> None:
        self.reg: list[int] = []
        self.mem: list[int] = []
        self.more = threading.Condition()

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        with self.more:
            (self.reg if offset == 0 else self.mem).append(int.from_bytes(data, "little"))
            self.more.notify_all()

    def wait(self, count: int, timeout: float = 60) -> None:
        with self.more:
            assert self.more.wait_for(lambda: len(self.mem) >= count, timeout), self.mem


def counter_machine() -> tuple[Machine, Ports]:
    m = real_mode_machine(COUNTER, lambda b: None)
    m.vcpus[0].fd.set_cpuid2(m.kvm.supported_cpuid())
    ports = Ports()
    m.pio.add(PORT, 8, ports)
    return m, ports


def test_counter_continues_after_restore_into_a_fresh_vm():
    m1, out1 = counter_machine()
    r1 = Runner(m1)
    r1.start()
    out1.wait(20)
    r1.pause()
    msrs = persist.msr_indices(m1.kvm)
    vcpu_state = persist.save_vcpu(m1.vcpus[0].fd, msrs)
    vm_state = persist.save_vm(m1.vm)
    memory = m1.mem.read(0, MEM)
    saved_regs = m1.vcpus[0].fd.get_regs()
    m1.stop(exitcodes.TERMINATED, "snapshot taken")
    assert r1.wait(30) == exitcodes.TERMINATED
    m1.close()
    # paused anywhere in the loop: each counter is at most one step ahead of its last output
    assert saved_regs.rcx - out1.reg[-1] in (0, 1) and out1.reg[-1] >= 20
    in_memory = int.from_bytes(memory[COUNTER_ADDR:COUNTER_ADDR + 4], "little")
    assert in_memory - out1.mem[-1] in (0, 1)

    m2 = Machine(MEM)
    out2 = Ports()
    m2.pio.add(PORT, 8, out2)
    m2.mem.write(0, memory)
    persist.check_cpu(m2.kvm, vcpu_state["cpuid"])
    persist.restore_vm(m2.vm, vm_state)
    persist.restore_vcpu(m2.vcpus[0].fd, vcpu_state)
    restored = m2.vcpus[0].fd.get_regs()
    assert (restored.rip, restored.rcx) == (saved_regs.rip, saved_regs.rcx)
    r2 = Runner(m2)
    r2.start()
    out2.wait(20)
    m2.stop(exitcodes.TERMINATED, "test")
    assert r2.wait(30) == exitcodes.TERMINATED
    m2.close()
    assert out2.reg[0] == out1.reg[-1] + 1 and out2.mem[0] == out1.mem[-1] + 1
    for seq in (out1.reg + out2.reg, out1.mem + out2.mem):
        assert seq == list(range(1, len(seq) + 1)), "the counter skipped, repeated or restarted"


def test_restore_then_save_gives_back_the_same_state():
    """Every item survives a restore into another vCPU (changed from its defaults first)."""
    m = Machine(MEM, vcpus=2)
    src, dst = m.vcpus[0].fd, m.vcpus[1].fd
    src.set_cpuid2(m.kvm.supported_cpuid())
    src.set_regs(kvm.Regs(rip=0x1234, rcx=0xDEADBEEF, rflags=0x202))
    changed_msrs = {0x174: 0x10, 0xC0000102: 0xFFFF800012345000}  # SYSENTER_CS, KERNEL_GS_BASE
    assert src.set_msrs(changed_msrs) == len(changed_msrs)
    d = src.get_debugregs()
    d.db[0], d.dr7 = 0x5000, d.dr7 | 0x3
    src.set_debugregs(d)
    msrs = persist.msr_indices(m.kvm)
    before = persist.save_vcpu(src, msrs)
    persist.restore_vcpu(dst, before)
    after = persist.save_vcpu(dst, msrs)
    assert set(after) == set(before)
    for key in before:
        if key != "msrs":
            assert after[key] == before[key], key
    saved = dict(persist.MSR_PAIR.iter_unpack(before["msrs"]))
    again = dict(persist.MSR_PAIR.iter_unpack(after["msrs"]))
    assert set(again) == set(saved) and saved.items() >= changed_msrs.items()
    TSC = 0x10    # the TSC keeps counting; every other MSR must come back as it was
    assert {i: v for i, v in again.items() if i != TSC} == \
        {i: v for i, v in saved.items() if i != TSC}
    m.close()


def test_vm_state_survives_a_restore():
    m1, m2 = Machine(MEM), Machine(MEM)
    chip = m1.vm.get_irqchip(kvm.IRQCHIP_IOAPIC)
    chip.chip.ioapic.redirtbl[3] = 0x31 | (1 << 15)       # vector 0x31, level-triggered
    m1.vm.set_irqchip(chip)
    state = persist.save_vm(m1.vm)
    persist.restore_vm(m2.vm, state)
    again = persist.save_vm(m2.vm)
    for key in ("pic_master", "pic_slave", "ioapic"):
        assert again[key] == state[key], key
    assert kvm.Irqchip.from_buffer_copy(again["ioapic"]).chip.ioapic.redirtbl[3] == 0x31 | 1 << 15
    saved_ns = kvm.ClockData.from_buffer_copy(state["clock"]).clock
    now_ns = kvm.ClockData.from_buffer_copy(again["clock"]).clock
    assert saved_ns <= now_ns < saved_ns + 10**9, (saved_ns, now_ns)
    pit, pit_again = (kvm.PitState2.from_buffer_copy(state["pit2"]),
                      kvm.PitState2.from_buffer_copy(again["pit2"]))
    assert [(c.count, c.mode, c.gate) for c in pit.channels] == \
        [(c.count, c.mode, c.gate) for c in pit_again.channels]
    m1.close()
    m2.close()


def saved_vcpu() -> dict[str, bytes]:
    m = Machine(MEM)
    m.vcpus[0].fd.set_cpuid2(m.kvm.supported_cpuid())
    state = persist.save_vcpu(m.vcpus[0].fd, persist.msr_indices(m.kvm))
    m.close()
    return state


@pytest.mark.parametrize("key", ["regs", "sregs", "xsave", "lapic", "vcpu_events", "cpuid"])
def test_truncated_vcpu_blob_is_refused_before_anything_is_set(key):
    state = saved_vcpu()
    full = len(state[key])
    state[key] = state[key][:-4]
    m = Machine(MEM)
    v = m.vcpus[0].fd
    v.set_regs(kvm.Regs(rip=0x4321, rflags=2))
    with pytest.raises(VoltError) as err:
        persist.restore_vcpu(v, state)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    assert f"'{key}'" in str(err.value) and f"is {full - 4} bytes" in str(err.value)
    if key != "cpuid":
        assert f"expected {full}" in str(err.value)
    assert v.get_regs().rip == 0x4321, "a refused snapshot changed the vCPU"
    m.close()


def test_missing_vcpu_and_vm_items_are_named():
    state = saved_vcpu()
    del state["debugregs"]
    m = Machine(MEM)
    with pytest.raises(VoltError) as err:
        persist.restore_vcpu(m.vcpus[0].fd, state)
    assert err.value.exit_code == exitcodes.SNAPSHOT and "'debugregs'" in str(err.value)
    vm_state = persist.save_vm(m.vm)
    vm_state["pit2"] = vm_state["pit2"] + b"\0"
    with pytest.raises(VoltError) as err:
        persist.restore_vm(m.vm, vm_state)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    size = ctypes.sizeof(kvm.PitState2)
    assert f"'pit2' is {size + 1} bytes, expected {size}" in str(err.value)
    vm_state = persist.save_vm(m.vm)
    vm_state["pic_master"], vm_state["ioapic"] = vm_state["ioapic"], vm_state["pic_master"]
    with pytest.raises(VoltError, match="'pic_master' holds irqchip 2, expected 0"):
        persist.restore_vm(m.vm, vm_state)
    m.close()


def test_an_msr_kvm_refuses_is_named():
    state = saved_vcpu()
    bogus = 0x4B564DFF    # in KVM's paravirtual range, but no MSR
    state["msrs"] += persist.MSR_PAIR.pack(bogus, 1)
    m = Machine(MEM)
    with pytest.raises(VoltError) as err:
        persist.restore_vcpu(m.vcpus[0].fd, state)
    assert err.value.exit_code == exitcodes.SNAPSHOT and f"{bogus:#x}" in str(err.value)
    m.close()


def _doctored(cpuid: bytes, leaf: int, reg: str, value: int) -> bytes:
    head, size = ctypes.sizeof(kvm.Cpuid2Header), ctypes.sizeof(kvm.CpuidEntry2)
    buf = bytearray(cpuid)
    for off in range(head, len(buf), size):
        e = kvm.CpuidEntry2.from_buffer(buf, off)
        if e.function == leaf and e.index == 0:
            setattr(e, reg, value)
    return bytes(buf)


def test_snapshot_from_another_cpu_model_is_refused():
    state = saved_vcpu()
    k = kvm.Kvm()
    persist.check_cpu(k, state["cpuid"])            # this host: accepted
    here = persist.cpu_signature(state["cpuid"])
    leaf1 = next(e for e in k.supported_cpuid() if e.function == 1)
    other_model = _doctored(state["cpuid"], 1, "eax", leaf1.eax ^ 0x50)   # model bits
    theirs = persist.cpu_signature(other_model)
    assert theirs != here
    with pytest.raises(VoltError) as err:
        persist.check_cpu(k, other_model)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    assert here in str(err.value) and theirs in str(err.value)
    intel = _doctored(state["cpuid"], 0, "ebx", int.from_bytes(b"Genu", "little"))
    intel = _doctored(intel, 0, "edx", int.from_bytes(b"ineI", "little"))
    intel = _doctored(intel, 0, "ecx", int.from_bytes(b"ntel", "little"))
    with pytest.raises(VoltError, match="GenuineIntel"):
        persist.check_cpu(k, intel)
    k.close()


def test_msr_indices_are_all_readable():
    m = Machine(MEM)
    v = m.vcpus[0].fd
    v.set_cpuid2(m.kvm.supported_cpuid())
    listed = m.kvm.msr_index_list()
    chosen = persist.msr_indices(m.kvm)
    assert chosen and set(chosen) <= set(listed)
    assert len(v.get_msrs(chosen)) == len(chosen)
    m.close()


def test_dirty_log_shows_the_pages_the_guest_wrote():
    m, out = counter_machine()
    r = m.mem.regions[0]
    m.vm.set_user_memory_region(0, r.guest_addr, r.size, r.host_addr, kvm.MEM_LOG_DIRTY_PAGES)
    runner = Runner(m)
    runner.start()
    out.wait(3)
    runner.pause()
    pages = r.size // 4096
    bitmap = m.vm.get_dirty_log(0, pages)
    dirty = {i for i in range(pages) if bitmap[i // 8] >> (i % 8) & 1}
    assert dirty == {COUNTER_ADDR // 4096}
    assert m.vm.get_dirty_log(0, pages) == bytes(len(bitmap)), "the log was not reset"
    m.stop(exitcodes.TERMINATED, "test")
    assert runner.wait(30) == exitcodes.TERMINATED
    m.close()


def test_kvmclock_ctrl_without_kvmclock_is_not_an_error():
    m = Machine(MEM)
    assert m.vcpus[0].fd.kvmclock_ctrl() is False     # the guest never enabled kvmclock
    m.close()


# -- the ctypes structs and ioctl numbers against <linux/kvm.h> ---------------------------

STRUCTS = {"kvm_xsave": kvm.Xsave, "kvm_xcrs": kvm.Xcrs, "kvm_vcpu_events": kvm.VcpuEvents,
           "kvm_debugregs": kvm.DebugRegs, "kvm_irqchip": kvm.Irqchip,
           "kvm_pic_state": kvm.PicState, "kvm_ioapic_state": kvm.IoapicState,
           "kvm_pit_channel_state": kvm.PitChannelState, "kvm_pit_state2": kvm.PitState2,
           "kvm_clock_data": kvm.ClockData, "kvm_dirty_log": kvm.DirtyLog,
           "kvm_msr_list": kvm.MsrList, "kvm_mp_state": kvm.MpState, "kvm_regs": kvm.Regs,
           "kvm_sregs": kvm.Sregs, "kvm_fpu": kvm.Fpu, "kvm_lapic_state": kvm.LapicState,
           "kvm_cpuid2": kvm.Cpuid2Header, "kvm_msrs": kvm.MsrsHeader}
IOCTLS = ["GET_XSAVE", "SET_XSAVE", "GET_XSAVE2", "GET_XCRS", "SET_XCRS", "GET_VCPU_EVENTS",
          "SET_VCPU_EVENTS", "GET_DEBUGREGS", "SET_DEBUGREGS", "GET_MP_STATE", "SET_MP_STATE",
          "GET_CPUID2", "SET_CPUID2", "GET_MSR_INDEX_LIST", "GET_IRQCHIP", "SET_IRQCHIP",
          "GET_PIT2", "SET_PIT2", "GET_CLOCK", "SET_CLOCK", "KVMCLOCK_CTRL", "GET_DIRTY_LOG",
          "GET_MSRS", "SET_MSRS", "GET_LAPIC", "SET_LAPIC", "GET_FPU", "SET_FPU"]
CONSTANTS = ["KVM_CAP_XSAVE", "KVM_CAP_XSAVE2", "KVM_CAP_XCRS", "KVM_CAP_DEBUGREGS",
             "KVM_CAP_VCPU_EVENTS", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_PIT_STATE2",
             "KVM_CAP_KVMCLOCK_CTRL", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_IRQCHIP_PIC_MASTER",
             "KVM_IRQCHIP_PIC_SLAVE", "KVM_IRQCHIP_IOAPIC"]

#: Fields whose place is easy to get wrong (padding, nested structs, the irqchip union).
OFFSETS = [("kvm_vcpu_events", "sipi_vector"), ("kvm_vcpu_events", "flags"),
           ("kvm_vcpu_events", "reserved"), ("kvm_vcpu_events", "exception_has_payload"),
           ("kvm_vcpu_events", "exception_payload"), ("kvm_xcrs", "xcrs"),
           ("kvm_xcrs", "padding"), ("kvm_irqchip", "chip"), ("kvm_ioapic_state", "redirtbl"),
           ("kvm_pit_channel_state", "count_load_time"), ("kvm_pit_state2", "flags"),
           ("kvm_clock_data", "realtime"), ("kvm_clock_data", "host_tsc"),
           ("kvm_clock_data", "pad"), ("kvm_debugregs", "flags"), ("kvm_dirty_log", "padding1")]


@pytest.mark.skipif(not Path("/usr/include/linux/kvm.h").exists() or not shutil.which("cc"),
                    reason="no <linux/kvm.h> or C compiler (apt-get install linux-libc-dev gcc)")
def test_structs_and_ioctl_numbers_match_the_kernel_header(tmp_path):
    lines = [f'printf("{n} %zu\\n", sizeof(struct {n}));' for n in STRUCTS]
    lines += [f'printf("KVM_{n} %lu\\n", (unsigned long)KVM_{n});' for n in IOCTLS]
    lines += [f'printf("{n} %lu\\n", (unsigned long){n});' for n in CONSTANTS]
    lines += [f'printf("{s}.{f} %zu\\n", offsetof(struct {s}, {f}));' for s, f in OFFSETS]
    src = tmp_path / "sizes.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <linux/kvm.h>\n"
                   "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    subprocess.run(["cc", "-o", str(tmp_path / "sizes"), str(src)], check=True)
    header = dict(line.split() for line in subprocess.run(
        [str(tmp_path / "sizes")], check=True, capture_output=True, text=True).stdout.splitlines())
    ours = {n: ctypes.sizeof(t) for n, t in STRUCTS.items()}
    ours |= {f"KVM_{n}": getattr(kvm, n) for n in IOCTLS}
    ours |= {n: getattr(kvm, n.removeprefix("KVM_")) for n in CONSTANTS}
    ours |= {f"{s}.{f}": getattr(STRUCTS[s], f).offset for s, f in OFFSETS}
    assert {n: int(v) for n, v in header.items()} == ours
