"""ELF vmlinux: load PT_LOAD segments at their physical addresses; find the PVH note.

A vmlinux has a 64-bit entry (``e_entry``, startup_64, physical) and, with
CONFIG_PVH, a Xen ELF note (type 18, XEN_ELFNOTE_PHYS32_ENTRY) naming a 32-bit
entry that takes an ``hvm_start_info`` instead of a zero page.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from volt.vmm.exitcodes import KERNEL, MEMORY, VoltError
from volt.vmm.layout import KERNEL_MIN_ADDR
from volt.vmm.memory import GuestMemory

PT_LOAD, PT_NOTE = 1, 4
EM_X86_64 = 62
XEN_ELFNOTE_PHYS32_ENTRY = 18


@dataclass(frozen=True)
class LoadedKernel:
    """Where a kernel went and how to enter it."""

    entry: int                 # 64-bit entry (long mode, RSI = zero page)
    pvh_entry: int | None      # 32-bit PVH entry (EBX = hvm_start_info), if any
    end: int                   # first guest byte after the kernel image
    setup_header: bytes | None = None   # bzImage only: the header to copy into boot_params


def is_elf(head: bytes) -> bool:
    return head[:4] == b"\x7fELF"


def load_elf(f: BinaryIO, mem: GuestMemory, path: str = "kernel") -> LoadedKernel:
    """Copy a vmlinux into guest memory; errors say what is wrong with the file."""
    f.seek(0)
    ehdr = f.read(64)
    if len(ehdr) < 64 or not is_elf(ehdr):
        raise VoltError(f"{path}: not an ELF file", KERNEL)
    if ehdr[4] != 2 or ehdr[5] != 1:
        raise VoltError(f"{path}: not a 64-bit little-endian ELF (an x86-64 vmlinux is)", KERNEL)
    (_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize,
     phnum) = struct.unpack_from("<HHIQQQIHHH", ehdr, 16)
    if machine != EM_X86_64:
        raise VoltError(f"{path}: ELF machine {machine} is not x86-64", KERNEL)
    if phentsize < 56 or phnum == 0 or phnum > 64:
        raise VoltError(f"{path}: ELF has no usable program headers", KERNEL)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    if len(table) < phentsize * phnum:
        raise VoltError(f"{path}: truncated ELF program header table", KERNEL)
    pvh_entry = None
    end = 0
    loads = []
    for i in range(phnum):
        (p_type, _pflags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz,
         _align) = struct.unpack_from("<IIQQQQQQ", table, i * phentsize)
        if p_type == PT_LOAD:
            if p_paddr < KERNEL_MIN_ADDR or p_filesz > p_memsz:
                raise VoltError(f"{path}: ELF segment at {p_paddr:#x} is not loadable "
                                "(below 1 MiB or file size over memory size)", KERNEL)
            loads.append((p_offset, p_paddr, p_filesz, p_memsz))
            end = max(end, p_paddr + p_memsz)
        elif p_type == PT_NOTE:
            f.seek(p_offset)
            pvh_entry = _pvh_entry(f.read(min(p_filesz, 1 << 16))) or pvh_entry
    if not loads:
        raise VoltError(f"{path}: ELF has no PT_LOAD segment", KERNEL)
    if not mem.contains(0, end):
        raise VoltError(f"guest memory ({mem.size >> 20} MiB) is too small for {path}, "
                        f"which needs {(end + (1 << 20) - 1) >> 20} MiB", MEMORY)
    for p_offset, p_paddr, p_filesz, p_memsz in loads:
        f.seek(p_offset)
        dst = mem.view(p_paddr, p_memsz)
        got = f.readinto(dst[:p_filesz])
        if got != p_filesz:
            raise VoltError(f"{path}: truncated ELF segment at {p_paddr:#x}", KERNEL)
        dst[p_filesz:] = bytes(p_memsz - p_filesz)
    if not any(p <= entry < p + m for _o, p, _f, m in loads):
        raise VoltError(f"{path}: ELF entry {entry:#x} is outside its segments", KERNEL)
    return LoadedKernel(entry=entry, pvh_entry=pvh_entry, end=end)


def _pvh_entry(notes: bytes) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address in a PT_NOTE segment, if there is one."""
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name_off = off + 12
        desc_off = name_off + ((namesz + 3) & ~3)
        nxt = desc_off + ((descsz + 3) & ~3)
        if nxt > len(notes):
            return None
        name = notes[name_off:name_off + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and descsz >= 4:
            size = 8 if descsz >= 8 else 4
            return int.from_bytes(notes[desc_off:desc_off + size], "little") & 0xFFFFFFFF
        off = nxt
    return None
