"""Tiny real-mode guests for ioctl-level tests on any /dev/kvm (even a slow emulated one)."""

from __future__ import annotations

import os
import struct

from volt.vmm import kvm
from volt.vmm.loader import elf
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
    v = m.vcpus[0].fd
    s = v.get_sregs()
    s.cs.base, s.cs.selector = 0, 0
    v.set_sregs(s)
    v.set_regs(kvm.Regs(rip=CODE_ADDR, rflags=0x2))
    return m


def triple_fault_machine() -> Machine:
    """Protected mode with a zero-limit CS and an empty IDT: the first fetch faults
    (#GP), which cannot be delivered (#DF), which cannot either: a triple fault."""
    m = real_mode_machine(b"\xf4", lambda b: None)
    v = m.vcpus[0].fd
    s = v.get_sregs()
    s.cr0 |= 1
    s.cs.limit = 0
    s.idt.base, s.idt.limit = 0, 0
    v.set_sregs(s)
    return m


def make_elf(entry: int = 0x1000000, paddr: int = 0x1000000, body: bytes = b"\x90" * 64,
             pvh: int | None = 0x1000010, machine: int = 62, bss: int = 0x100) -> bytes:
    """A minimal ELF64 with one PT_LOAD and (optionally) the Xen PVH entry note."""
    note = b""
    if pvh is not None:
        note = struct.pack("<III", 4, 4, elf.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + \
            struct.pack("<I", pvh)
    phnum = 2 if note else 1
    data_off = 64 + 56 * phnum
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, machine, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", elf.PT_LOAD, 5, data_off, paddr, paddr, len(body),
                        len(body) + bss, 0x1000)
    if note:
        phdrs += struct.pack("<IIQQQQQQ", elf.PT_NOTE, 4, data_off + len(body), 0, 0,
                             len(note), len(note), 4)
    return ehdr + phdrs + body + note
