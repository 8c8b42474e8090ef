"""An Intel MP table (spec 1.4) in the EBDA: CPUs, one ISA bus, the IOAPIC, IRQ routes.

Without ACPI this is how Linux learns about the other vCPUs and the IOAPIC.
"""

from __future__ import annotations

import struct

from volt.vmm import layout
from volt.vmm.memory import GuestMemory

APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED, CPU_BSP = 1, 2
MP_IRQ_INT, MP_IRQ_NMI, MP_IRQ_EXTINT = 0, 1, 3
MAX_CPUS = 32           # what fits in the 1 KiB EBDA


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def build(ncpus: int, base: int = layout.EBDA_START) -> bytes:
    """The floating pointer followed by the config table, ready to copy to ``base``."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise ValueError(f"MP table holds 1..{MAX_CPUS} CPUs, not {ncpus}")
    ioapic_id = ncpus + 1
    body = bytearray()
    for cpu in range(ncpus):
        flags = CPU_ENABLED | (CPU_BSP if cpu == 0 else 0)
        body += struct.pack("<BBBBIIII", 0, cpu, APIC_VERSION, flags, 0x600, 0x201, 0, 0)
    body += struct.pack("<BB6s", 1, 0, b"ISA   ")
    body += struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR)
    for irq in range(layout.IRQ_MAX + 1):
        body += struct.pack("<BBHBBBB", 3, MP_IRQ_INT, 0, 0, irq, ioapic_id, irq)
    body += struct.pack("<BBHBBBB", 4, MP_IRQ_EXTINT, 0, 0, 0, 0xFF, 0)
    body += struct.pack("<BBHBBBB", 4, MP_IRQ_NMI, 0, 0, 0, 0xFF, 1)
    count = ncpus + 1 + 1 + (layout.IRQ_MAX + 1) + 2
    header = bytearray(struct.pack("<4sHBB8s12sIHHII", b"PCMP", 44 + len(body), 4, 0,
                                   b"VOLT    ", b"MICROVM     ", 0, 0, count,
                                   layout.APIC_ADDR, 0))
    table = header + body
    table[7] = _checksum(table)
    mpf = bytearray(struct.pack("<4sIBBB5s", b"_MP_", base + 16, 1, 4, 0, bytes(5)))
    mpf[10] = _checksum(mpf)
    return bytes(mpf + table)


def write(mem: GuestMemory, ncpus: int) -> None:
    mem.write(layout.EBDA_START, build(ncpus))
