"""The zero page (boot_params) with e820 map, command line, initrd; PVH start_info.

Both boot paths describe the same memory map: low RAM up to the EBDA, RAM from
1 MiB up to the top of guest memory (split around the 32-bit MMIO gap).
"""

from __future__ import annotations

import struct

from volt.vmm import layout
from volt.vmm.exitcodes import CMDLINE, INITRD, MEMORY, VoltError
from volt.vmm.loader.elf import LoadedKernel
from volt.vmm.loader.kernel import open_regular
from volt.vmm.memory import GuestMemory

ZERO_PAGE_SIZE = 4096
E820_MAX = 128
PVH_MAGIC = 0x336EC578
KERNEL_ALIGNMENT = 0x0100_0000


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries for guest RAM."""
    entries = [(0, layout.EBDA_START, layout.E820_RAM)]
    for r in mem.regions:
        start = max(r.guest_addr, layout.HIMEM_START)
        if r.end > start:
            entries.append((start, r.end - start, layout.E820_RAM))
    return entries


def check_cmdline(cmdline: str, limit: int = layout.CMDLINE_MAX) -> bytes:
    """The NUL-terminated command line, or a clear error when the kernel cannot take it."""
    raw = cmdline.encode()
    if b"\0" in raw:
        raise VoltError("kernel command line contains a NUL byte", CMDLINE)
    if len(raw) + 1 > limit:
        raise VoltError(f"kernel command line is {len(raw)} bytes; this kernel takes at most "
                        f"{limit - 1}", CMDLINE)
    return raw + b"\0"


def place_initrd(mem: GuestMemory, data: bytes, kernel_end: int, max_addr: int) -> int:
    """Copy the initrd to the top of low RAM (page aligned); return its address."""
    top = min(mem.low_end, max_addr + 1)
    addr = (top - len(data)) & ~0xFFF
    if addr < kernel_end:
        raise VoltError(f"guest memory ({mem.size >> 20} MiB) is too small for the kernel "
                        f"plus a {len(data) >> 10} KiB initrd", MEMORY)
    mem.write(addr, data)
    return addr


def write_zero_page(mem: GuestMemory, kernel: LoadedKernel, cmdline: bytes,
                    initrd: tuple[int, int] | None) -> None:
    """boot_params at ZERO_PAGE_ADDR for the 64-bit entry of a vmlinux or bzImage."""
    zp = bytearray(ZERO_PAGE_SIZE)
    if kernel.setup_header:
        zp[0x1F1:0x1F1 + len(kernel.setup_header)] = kernel.setup_header
    else:
        struct.pack_into("<H", zp, 0x1FE, 0xAA55)
        struct.pack_into("<I", zp, 0x202, 0x53726448)
        struct.pack_into("<I", zp, 0x230, KERNEL_ALIGNMENT)
    zp[0x210] = 0xFF                                  # type_of_loader: undefined
    zp[0x211] |= 0x01                                 # loadflags: LOADED_HIGH
    mem.write(layout.CMDLINE_ADDR, cmdline)
    struct.pack_into("<I", zp, 0x228, layout.CMDLINE_ADDR)
    struct.pack_into("<I", zp, 0x238, len(cmdline) - 1)
    if initrd:
        struct.pack_into("<II", zp, 0x218, initrd[0], initrd[1])
    entries = e820_map(mem)
    zp[0x1E8] = len(entries)
    for i, (addr, size, kind) in enumerate(entries[:E820_MAX]):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, addr, size, kind)
    mem.write(layout.ZERO_PAGE_ADDR, zp)


def write_pvh_start_info(mem: GuestMemory, cmdline: bytes,
                         initrd: tuple[int, int] | None) -> int:
    """hvm_start_info (version 1) with memory map and initrd module; returns its address."""
    mem.write(layout.CMDLINE_ADDR, cmdline)
    entries = e820_map(mem)
    for i, (addr, size, kind) in enumerate(entries):
        mem.write(layout.PVH_MEMMAP_ADDR + 24 * i, struct.pack("<QQII", addr, size, kind, 0))
    nmods = 0
    if initrd:
        mem.write(layout.PVH_MODLIST_ADDR, struct.pack("<QQQQ", initrd[0], initrd[1], 0, 0))
        nmods = 1
    info = struct.pack("<IIIIQQQQII", PVH_MAGIC, 1, 0, nmods,
                       layout.PVH_MODLIST_ADDR if nmods else 0, layout.CMDLINE_ADDR, 0,
                       layout.PVH_MEMMAP_ADDR, len(entries), 0)
    mem.write(layout.PVH_INFO_ADDR, info)
    return layout.PVH_INFO_ADDR


def read_initrd(path: str) -> bytes:
    try:
        with open_regular(path, "initrd", INITRD) as f:
            data = f.read()
    except OSError as exc:
        raise VoltError(f"initrd {path}: {exc.strerror}", INITRD) from None
    if not data:
        raise VoltError(f"initrd {path}: file is empty", INITRD)
    return data
