"""Open a kernel file, recognise its format (ELF vmlinux or bzImage) and load it."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

from volt.vmm import layout
from volt.vmm.exitcodes import KERNEL, VoltError
from volt.vmm.loader import bzimage, elf
from volt.vmm.memory import GuestMemory


@dataclass
class KernelImage:
    """An opened, recognised kernel file, not yet in guest memory."""

    path: str
    file: BinaryIO
    kind: str                   # "elf" | "bzimage"
    cmdline_limit: int
    initrd_addr_max: int


def open_kernel(path: str) -> KernelImage:
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise VoltError(f"kernel {path}: {exc.strerror}", KERNEL) from None
    return recognise(path, f)


def kernel_from_bytes(label: str, data: bytes) -> KernelImage:
    """An image already in memory (reassembled from NEBULA); ``label`` names it in errors."""
    return recognise(label, io.BytesIO(data))


def recognise(path: str, f: BinaryIO) -> KernelImage:
    """Tell an ELF vmlinux from a bzImage by their headers; anything else is refused."""
    head = f.read(0x1000)
    if elf.is_elf(head):
        return KernelImage(path, f, "elf", layout.CMDLINE_MAX, 0xFFFF_FFFF)
    if bzimage.is_bzimage(head):
        version = struct.unpack_from("<H", head, 0x206)[0]
        limit = struct.unpack_from("<I", head, 0x238)[0] + 1 if version >= 0x206 else 256
        addr_max = struct.unpack_from("<I", head, 0x22C)[0] or 0x37FF_FFFF
        return KernelImage(path, f, "bzimage", min(limit, 1 << 16), addr_max)
    f.close()
    raise VoltError(f"kernel {path}: neither an ELF vmlinux nor a bzImage", KERNEL)


def load(image: KernelImage, mem: GuestMemory) -> elf.LoadedKernel:
    try:
        if image.kind == "elf":
            return elf.load_elf(image.file, mem, image.path)
        return bzimage.load_bzimage(image.file, mem, image.path)
    finally:
        image.file.close()
