"""ioctl-level tests on this machine's /dev/kvm with tiny real-mode guests."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from volt.vmm import cpu, exitcodes
from volt.vmm.runner import Runner
from volt.vmm.vm import Machine

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import (  # noqa: E402
    DOTS_FOREVER,
    HELLO_RESET,
    kvm_unusable,
    real_mode_machine,
    triple_fault_machine,
)

pytestmark = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))


def test_guest_writes_serial_and_resets_cleanly():
    out: list[bytes] = []
    m = real_mode_machine(HELLO_RESET, out.append)
    r = Runner(m)
    r.start()
    assert r.wait(120) == exitcodes.OK
    assert m.exit_reason == "guest reset"
    assert b"".join(out) == b"Hi\n"
    m.close()


def test_triple_fault_has_its_own_exit_code():
    m = triple_fault_machine()
    r = Runner(m)
    r.start()
    assert r.wait(120) == exitcodes.TRIPLE_FAULT
    assert "triple fault" in m.exit_reason
    m.close()


def test_pause_stops_guest_and_resume_continues_it():
    out: list[bytes] = []
    m = real_mode_machine(DOTS_FOREVER, out.append)
    r = Runner(m)
    r.start()
    deadline = time.monotonic() + 60
    while len(out) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    r.pause()
    assert r.paused
    frozen = len(out)
    time.sleep(0.3)
    assert len(out) == frozen, "a paused vCPU still produced output"
    r.resume()
    deadline = time.monotonic() + 60
    while len(out) <= frozen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(out) > frozen
    m.stop(exitcodes.TERMINATED, "test")
    assert r.wait(30) == exitcodes.TERMINATED
    m.close()


def test_vcpu_setup_lapic_msrs_cpuid_on_two_vcpus():
    m = Machine(2 << 20, vcpus=2)
    supported = m.kvm.supported_cpuid()
    for i, v in enumerate(vc.fd for vc in m.vcpus):
        table = cpu.normalize_cpuid(supported, i, 2, 2_000_000, tsc_deadline=True)
        cpu.configure_vcpu(v, table)
        leaf1 = next(e for e in table if e.function == 1)
        assert leaf1.ebx >> 24 == i
        assert leaf1.ecx & cpu.LEAF1_ECX_HYPERVISOR and leaf1.ecx & cpu.LEAF1_ECX_TSC_DEADLINE
        sig = next(e for e in table if e.function == cpu.KVM_CPUID_SIGNATURE)
        assert sig.eax == cpu.KVM_CPUID_TSC_FREQ
        tsc = next(e for e in table if e.function == cpu.KVM_CPUID_TSC_FREQ)
        assert (tsc.eax, tsc.ebx) == (2_000_000, cpu.APIC_BUS_KHZ)
        regs = bytes(v.get_lapic().regs)
        lvt0 = int.from_bytes(regs[cpu.APIC_LVT0:cpu.APIC_LVT0 + 4], "little")
        lvt1 = int.from_bytes(regs[cpu.APIC_LVT1:cpu.APIC_LVT1 + 4], "little")
        assert (lvt0 >> 8) & 7 == cpu.APIC_MODE_EXTINT
        assert (lvt1 >> 8) & 7 == cpu.APIC_MODE_NMI
        msrs = v.get_msrs([cpu.MSR_MTRR_DEF_TYPE, cpu.MSR_IA32_MISC_ENABLE])
        assert msrs[cpu.MSR_MTRR_DEF_TYPE] == cpu.MTRR_ENABLE | cpu.MTRR_MEM_TYPE_WB
        assert msrs[cpu.MSR_IA32_MISC_ENABLE] & cpu.MISC_ENABLE_FAST_STRING
        assert v.get_fpu().fcw == 0x37F     # (this emulated /dev/kvm does not keep MXCSR)
    m.close()


def test_long_mode_registers_and_page_tables():
    m = Machine(4 << 20, vcpus=1)
    v = m.vcpus[0].fd
    cpu.setup_long_mode(v, m.mem, 0x200000)
    s = v.get_sregs()
    assert s.efer & (cpu.EFER_LME | cpu.EFER_LMA) == cpu.EFER_LME | cpu.EFER_LMA
    assert s.cs.l == 1 and s.cs.selector == 8 and s.ds.selector == 16
    assert s.cr0 & cpu.X86_CR0_PG and s.cr4 & cpu.X86_CR4_PAE
    assert m.mem.read_u64(s.cr3) & ~0xFFF == 0xA000
    assert m.mem.read_u64(0xB000 + 8 * 3) == (3 << 21) | 0x83
    r = v.get_regs()
    assert (r.rip, r.rsi, r.rflags) == (0x200000, 0x7000, 2)
    m.close()


def test_irqfd_and_ioeventfd_register():
    m = Machine(1 << 20)
    assert m.has_irqfd
    trigger = m.interrupt(5)
    assert trigger.fd is not None
    trigger()     # an edge on GSI 5 through the irqfd; must not raise
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    m.vm.ioeventfd(efd, 0xD0000050, 4)
    os.close(efd)
    m.close()


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from tinyguest import DOTS_FOREVER, real_mode_machine
    from volt.vmm.runner import Runner
    m = real_mode_machine(DOTS_FOREVER, lambda b: None)
    print("ready", flush=True)
    code = Runner(m).run()
    print("volt: " + m.exit_reason, file=sys.stderr)
    sys.exit(code)
""")


def test_sigterm_shuts_down_cleanly_with_its_exit_code():
    script = SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == exitcodes.TERMINATED, err
    assert "SIGTERM" in err and "Traceback" not in err


def test_kick_interrupts_kvm_run():
    """A vCPU blocked in KVM_RUN leaves it when kicked (immediate_exit + signal)."""
    m = real_mode_machine(DOTS_FOREVER, lambda b: None)
    r = Runner(m)
    r.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    m.stop(exitcodes.TERMINATED, "test")
    assert r.wait(30) == exitcodes.TERMINATED
    assert not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("vcpu"))
    assert time.monotonic() - t0 < 30
    m.close()


class Recorder:
    """A virtio device that only records queue notifications."""

    device_id = 0x7F
    features = 1 << 32
    queue_sizes = (8, 8)

    def __init__(self) -> None:
        self.notified: list[int] = []

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features, mem, queues, interrupt) -> None:
        pass

    def notify(self, queue: int) -> None:
        self.notified.append(queue)

    def reset(self) -> None:
        pass


def test_kick_and_interrupt_ack_cost_no_exit_and_the_status_read_one():
    """Per request the guest reads InterruptStatus (one exit, answered by the vCPU's C
    run loop without Python); its ACK of the used-ring bit and its queue kick are
    absorbed by KVM (ioeventfds)."""
    from volt.vmm.devices.virtio_mmio import (
        INT_VRING,
        INTERRUPT_ACK,
        INTERRUPT_STATUS,
        QUEUE_NOTIFY,
    )

    m = Machine(1 << 20)
    m.add_legacy_devices(lambda b: None)
    dev = Recorder()
    t = m.devices.attach("rec", dev)
    t.state.status = 1 | 2 | 8 | 4
    base = 0xD0000000
    # 32-bit flat mode: mov eax, [status] ; mov [0x2000], eax ; mov dword [ack], 1 ;
    # mov dword [notify], 1 ; mov al, 0xfe ; out 0x64, al
    code = (b"\xa1" + struct.pack("<I", base + INTERRUPT_STATUS)
            + b"\xa3" + struct.pack("<I", 0x2000)
            + b"\xc7\x05" + struct.pack("<II", base + INTERRUPT_ACK, INT_VRING)
            + b"\xc7\x05" + struct.pack("<II", base + QUEUE_NOTIFY, 1)
            + bytes.fromhex("b0fee664"))
    m.mem.write(0x1000, code)
    cpu.setup_pvh(m.vcpus[0].fd, m.mem, 0x1000, 0)
    r = Runner(m)
    r.start()
    assert r.wait(120) == exitcodes.OK
    deadline = time.monotonic() + 10
    while not dev.notified and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.notified == [1]
    assert m.mem.read(0x2000, 4) == struct.pack("<I", INT_VRING)
    exits = m.vcpus[0].exits
    assert exits["mmio_read_in_c"] == 1 and exits["mmio_read"] == 0, exits
    assert exits["mmio_write"] == 0, exits
    m.close()


def test_halt_with_interrupts_off_ends_vm_as_poweroff_but_idle_halt_does_not():
    """Linux without ACPI powers off by halting every CPU with interrupts disabled."""
    m = real_mode_machine(bytes.fromhex("faf4"), lambda b: None)       # cli; hlt
    r = Runner(m)
    r.start()
    assert r.wait(60) == exitcodes.OK
    assert m.exit_reason == "guest halted (powered off)"
    m.close()
    m = real_mode_machine(bytes.fromhex("fbf4ebfd"), lambda b: None)   # sti; 1: hlt; jmp 1b
    r = Runner(m)
    r.start()
    assert r.wait(3.5) is None, m.exit_reason                           # idle is not dead
    m.stop(exitcodes.TERMINATED, "test")
    assert r.wait(30) == exitcodes.TERMINATED
    m.close()
