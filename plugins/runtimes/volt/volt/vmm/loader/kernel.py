"""Open a kernel file, recognise its format (ELF vmlinux or bzImage) and load it."""

from __future__ import annotations

import io
import os
import stat
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


def open_regular(path: str, what: str, code: int) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, else a VoltError(``code``).

    Opened non-blocking first, so a FIFO cannot hang the open, and checked on the
    open descriptor: a FIFO never ends and /dev/zero never stops, so reading one
    as a kernel or initrd would hang or fill memory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise VoltError(f"{what} {path}: {exc.strerror}", code) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket")
        raise VoltError(f"{what} {path} is {kind}, not a regular file", code)
    os.set_blocking(fd, True)
    return open(fd, "rb")


def open_kernel(path: str) -> KernelImage:
    f = open_regular(path, "kernel", KERNEL)
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
