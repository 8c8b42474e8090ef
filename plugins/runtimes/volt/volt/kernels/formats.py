"""Recognise x86-64 Linux kernel images: an ELF vmlinux or a bzImage.

Volt boots both (ELF through its PVH note or 64-bit entry, bzImage through the
64-bit boot protocol), so anything else is refused up front with a message that
says what the file looked like instead.
"""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from stellarium_core.errors import UsageError

EM_X86_64 = 62
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
XLF_KERNEL_64 = 1


class NotAKernelError(UsageError):
    """The file is not an x86-64 Linux kernel Volt can boot."""


@dataclass(frozen=True)
class KernelInfo:
    """What a kernel image is: its format and the facts a loader cares about."""

    format: str  # "elf" (vmlinux) or "bzimage"
    version: str | None  # the release, e.g. "6.1.0-56-amd64"
    pvh: bool  # ELF: carries the PVH 32-bit entry note
    boot_protocol: str | None  # bzImage: setup header version, e.g. "2.15"
    entry64: bool  # bzImage: has the 64-bit entry (XLF_KERNEL_64); ELF: always

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


_VERSION = re.compile(rb"Linux version (\d+\.\d+[\w.+~-]*)")


def _version_string(data: bytes) -> str | None:
    m = _VERSION.search(data)
    return m[1].decode() if m else None


def _elf(data: bytes, path: Path) -> KernelInfo:
    if len(data) < 64 or data[4] != 2:
        raise NotAKernelError(f"{path} is a 32-bit ELF file, not an x86-64 vmlinux")
    if data[5] != 1:
        raise NotAKernelError(f"{path} is a big-endian ELF file, not an x86-64 vmlinux")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise NotAKernelError(f"{path} is an ELF file for machine {e_machine}, not x86-64 "
                              f"({EM_X86_64})")
    if e_type != 2:
        raise NotAKernelError(f"{path} is an x86-64 ELF file but not an executable "
                              f"(e_type {e_type}); a vmlinux is ET_EXEC")
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    pvh = False
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == PT_NOTE:
            pvh = pvh or _has_pvh_note(data[p_offset:p_offset + p_filesz])
    version = _version_string(data)
    if version is None:
        raise NotAKernelError(f"{path} is an x86-64 ELF executable but has no 'Linux version' "
                              "banner; it is not a Linux vmlinux")
    return KernelInfo("elf", version, pvh, None, True)


def _has_pvh_note(notes: bytes) -> bool:
    off = 0
    while off + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, off)
        name = notes[off + 12:off + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _bzimage(data: bytes, path: Path) -> KernelInfo:
    if struct.unpack_from("<H", data, 0x1FE)[0] != 0xAA55:
        raise NotAKernelError(f"{path} has the 'HdrS' magic but no 0xAA55 boot flag; "
                              "it is not a bzImage")
    proto, = struct.unpack_from("<H", data, 0x206)
    loadflags = data[0x211]
    if proto < 0x0200 or not loadflags & 1:
        raise NotAKernelError(f"{path} is a zImage or too old (boot protocol "
                              f"{proto >> 8}.{proto & 0xFF}); Volt needs a bzImage")
    setup_sects = data[0x1F1] or 4
    syssize, = struct.unpack_from("<I", data, 0x1F4)
    if (setup_sects + 1) * 512 + syssize * 16 > len(data):
        raise NotAKernelError(f"{path} is a truncated bzImage: its header announces "
                              f"{(setup_sects + 1) * 512 + syssize * 16} bytes, the file has "
                              f"{len(data)}")
    xloadflags = struct.unpack_from("<H", data, 0x236)[0] if proto >= 0x020C else 0
    version = None
    ver_off, = struct.unpack_from("<H", data, 0x20E)
    if ver_off:
        raw = data[0x200 + ver_off:0x200 + ver_off + 128].split(b"\0")[0]
        version = raw.split(b" ")[0].decode(errors="replace") or None
    return KernelInfo("bzimage", version, False, f"{proto >> 8}.{proto & 0xFF:02d}",
                      bool(xloadflags & XLF_KERNEL_64))


def inspect(path: Path) -> KernelInfo:
    """Identify ``path`` as an ELF vmlinux or a bzImage, or raise NotAKernelError."""
    path = Path(path)
    if not path.is_file():
        raise NotAKernelError(f"{path}: no such file" if not path.exists()
                              else f"{path} is not a regular file")
    data = path.read_bytes()
    try:
        if data[:4] == b"\x7fELF":
            return _elf(data, path)
        if len(data) > 0x240 and data[0x202:0x206] == b"HdrS":
            return _bzimage(data, path)
    except (struct.error, IndexError):
        raise NotAKernelError(f"{path} looks like a kernel image but is truncated or "
                              "malformed") from None
    raise NotAKernelError(f"{path} is not a Linux kernel: neither an x86-64 ELF vmlinux "
                          "(no ELF magic) nor a bzImage (no 'HdrS' at offset 0x202)")
