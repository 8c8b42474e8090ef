"""bzImage: the x86 boot protocol, entered through its 64-bit entry point.

The protected-mode kernel (after the real-mode setup sectors) is copied to
1 MiB and entered at +0x200 in long mode with RSI pointing at the zero page,
which needs boot protocol 2.12+ with XLF_KERNEL_64.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from volt.vmm.exitcodes import KERNEL, MEMORY, VoltError
from volt.vmm.layout import HIMEM_START
from volt.vmm.loader.elf import LoadedKernel
from volt.vmm.memory import GuestMemory

HDRS = 0x53726448
XLF_KERNEL_64 = 1


def is_bzimage(head: bytes) -> bool:
    return len(head) >= 0x206 and struct.unpack_from("<I", head, 0x202)[0] == HDRS


def load_bzimage(f: BinaryIO, mem: GuestMemory, path: str = "kernel") -> LoadedKernel:
    f.seek(0)
    head = f.read(0x1000)
    if not is_bzimage(head) or struct.unpack_from("<H", head, 0x1FE)[0] != 0xAA55:
        raise VoltError(f"{path}: not a bzImage (no HdrS boot header)", KERNEL)
    version = struct.unpack_from("<H", head, 0x206)[0]
    xloadflags = struct.unpack_from("<H", head, 0x236)[0]
    if version < 0x20C or not xloadflags & XLF_KERNEL_64:
        raise VoltError(f"{path}: boot protocol {version >> 8}.{version & 0xff} without a "
                        "64-bit entry point (need 2.12+ and XLF_KERNEL_64)", KERNEL)
    setup_sects = head[0x1F1] or 4
    init_size = struct.unpack_from("<I", head, 0x260)[0]
    f.seek(0, 2)
    file_size = f.tell()
    offset = (setup_sects + 1) * 512
    size = file_size - offset
    if size <= 0:
        raise VoltError(f"{path}: truncated bzImage", KERNEL)
    end = HIMEM_START + max(size, init_size)
    if not mem.contains(0, end):
        raise VoltError(f"guest memory ({mem.size >> 20} MiB) is too small for {path}, "
                        f"which needs {(end + (1 << 20) - 1) >> 20} MiB", MEMORY)
    f.seek(offset)
    if f.readinto(mem.view(HIMEM_START, size)) != size:
        raise VoltError(f"{path}: short read", KERNEL)
    hdr_end = 0x202 + head[0x201]
    return LoadedKernel(entry=HIMEM_START + 0x200, pvh_entry=None, end=end,
                        setup_header=bytes(head[0x1F1:hdr_end]))
