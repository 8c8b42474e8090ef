"""Tiny real-mode guests for ioctl-level tests on any /dev/kvm (even a slow emulated one)."""

from __future__ import annotations

import os

from volt.vmm import kvm
from volt.vmm.vm import Machine

CODE_ADDR = 0x1000

#: mov dx,0x3f8; "Hi\n" to COM1; mov al,0xfe; out 0x64,al (i8042 reset); hlt
HELLO_RESET = bytes.fromhex("baf803" "b048ee" "b069ee" "b00aee" "b0fee664" "f4")
#: mov dx,0x3f8; mov al,'.'; 1: out dx,al; jmp 1b
DOTS_FOREVER = bytes.fromhex("baf803" "b02e" "ee" "ebfd")


def kvm_unusable() -> str | None:
    """Why /dev/kvm cannot be used here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible"
    return None


def real_mode_machine(code: bytes, sink, vcpus: int = 1) -> Machine:  # noqa: ANN001
    """A 1 MiB machine whose boot vCPU starts at CODE_ADDR in real mode, with COM1+i8042."""
    m = Machine(1 << 20, vcpus)
    m.add_legacy_devices(sink)
    m.mem.write(CODE_ADDR, code)
    v = m.vcpus[0]
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    v.set_sregs(s)
    v.set_regs(kvm.Regs(rip=CODE_ADDR, rflags=0x2))
    return m


def triple_fault_machine() -> Machine:
    """Protected mode with a zero-limit CS and an empty IDT: the first fetch faults
    (#GP), which cannot be delivered (#DF), which cannot either: a triple fault."""
    m = real_mode_machine(b"\xf4", lambda b: None)
    v = m.vcpus[0]
    s = v.get_sregs()
    s.cr0 |= 1
    s.cs.limit = 0
    s.idt.base, s.idt.limit = 0, 0
    v.set_sregs(s)
    return m
