"""Loaders and boot tables: ELF/PVH, bzImage, zero page, e820, MP table."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import pytest
from volt.vmm import exitcodes, layout
from volt.vmm.exitcodes import VoltError
from volt.vmm.loader import bootparams, bzimage, elf, mptable
from volt.vmm.loader.kernel import load, open_kernel
from volt.vmm.memory import GuestMemory, GuestMemoryError

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import make_elf  # noqa: E402


@pytest.fixture
def mem():
    with GuestMemory(32 << 20) as m:
        yield m


def test_elf_loads_segment_zeroes_bss_and_finds_pvh(mem):
    mem.write(0x1000040, b"\xff" * 0x100)
    k = elf.load_elf(io.BytesIO(make_elf()), mem)
    assert (k.entry, k.pvh_entry) == (0x1000000, 0x1000010)
    assert mem.read(0x1000000, 64) == b"\x90" * 64
    assert mem.read(0x1000040, 0x100) == bytes(0x100)
    assert k.end == 0x1000000 + 64 + 0x100


@pytest.mark.parametrize("blob, message", [
    (b"\x7fELF" + bytes([1, 1]) + bytes(58), "64-bit"),
    (make_elf(machine=3), "not x86-64"),
    (make_elf(paddr=0x1000), "not loadable"),
    (make_elf(entry=0x2000000), "outside its segments"),
    (make_elf()[:120], "truncated"),
])
def test_bad_elf_is_a_kernel_error(mem, blob, message):
    with pytest.raises(VoltError, match=message) as err:
        elf.load_elf(io.BytesIO(blob), mem)
    assert err.value.exit_code == exitcodes.KERNEL


def test_elf_bigger_than_memory_is_a_memory_error():
    with GuestMemory(8 << 20) as small, pytest.raises(VoltError, match="too small") as err:
        elf.load_elf(io.BytesIO(make_elf()), small)
    assert err.value.exit_code == exitcodes.MEMORY


def test_zero_page_carries_cmdline_initrd_and_e820(mem):
    k = elf.LoadedKernel(entry=0x1000000, pvh_entry=None, end=0x1100000)
    cmd = bootparams.check_cmdline("console=ttyS0 quiet")
    bootparams.write_zero_page(mem, k, cmd, (0x1800000, 0x1234))
    zp = mem.read(layout.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<I", zp, 0x202)[0] == bzimage.HDRS
    assert struct.unpack_from("<II", zp, 0x218) == (0x1800000, 0x1234)
    assert struct.unpack_from("<I", zp, 0x228)[0] == layout.CMDLINE_ADDR
    assert mem.read(layout.CMDLINE_ADDR, len(cmd)) == cmd
    n = zp[0x1E8]
    table = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(n)]
    assert table == [(0, layout.EBDA_START, 1), (0x100000, (32 << 20) - 0x100000, 1)]


def test_pvh_start_info(mem):
    addr = bootparams.write_pvh_start_info(mem, b"ro\0", (0x1800000, 4096))
    magic, version, _flags, nmods, modlist, cmdline, _rsdp, memmap, nmap, _r = struct.unpack(
        "<IIIIQQQQII", mem.read(addr, 56))
    assert (magic, version, nmods, cmdline, nmap) == (bootparams.PVH_MAGIC, 1, 1,
                                                      layout.CMDLINE_ADDR, 2)
    assert struct.unpack("<QQ", mem.read(modlist, 16)) == (0x1800000, 4096)
    assert struct.unpack("<QQI", mem.read(memmap + 24, 20)) == (0x100000, (32 << 20) - 0x100000, 1)


def test_cmdline_too_long_is_a_cmdline_error():
    bootparams.check_cmdline("x" * 2047)
    with pytest.raises(VoltError, match="at most 2047") as err:
        bootparams.check_cmdline("x" * 2048)
    assert err.value.exit_code == exitcodes.CMDLINE


def test_initrd_placed_page_aligned_at_top_and_too_big_fails(mem):
    addr = bootparams.place_initrd(mem, b"A" * 5000, 0x1100000, 0xFFFFFFFF)
    assert addr % 4096 == 0 and addr + 5000 <= mem.size and mem.read(addr, 5) == b"AAAAA"
    with pytest.raises(VoltError) as err:
        bootparams.place_initrd(mem, b"A" * (31 << 20), 0x1100000, 0xFFFFFFFF)
    assert err.value.exit_code == exitcodes.MEMORY


def test_mptable_checksums_and_entries():
    blob = mptable.build(2)
    mpf, table = blob[:16], blob[16:]
    assert mpf[:4] == b"_MP_" and sum(mpf) % 256 == 0
    assert struct.unpack_from("<I", mpf, 4)[0] == layout.EBDA_START + 16
    length, count = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    assert table[:4] == b"PCMP" and length == len(table) and sum(table) % 256 == 0
    assert count == 2 + 1 + 1 + 24 + 2
    body = table[44:]
    cpus = [body[i * 20:(i + 1) * 20] for i in range(2)]
    assert [c[1] for c in cpus] == [0, 1] and cpus[0][3] & mptable.CPU_BSP
    assert len(blob) <= 0x400
    with pytest.raises(ValueError):
        mptable.build(mptable.MAX_CPUS + 1)


def test_guest_memory_bounds():
    with GuestMemory(1 << 20) as m:
        with pytest.raises(GuestMemoryError):
            m.read((1 << 20) - 2, 4)
        m.write_u64(0x100, 0xDEADBEEF)
        assert m.read_u64(0x100) == 0xDEADBEEF
        with pytest.raises(GuestMemoryError):
            m.view(-8, 8)


def test_real_vmlinux_has_64bit_and_pvh_entries(guest_kernel):
    with GuestMemory(128 << 20) as m:
        k = load(open_kernel(str(guest_kernel.vmlinux)), m)
        assert k.entry >= 0x1000000 and k.pvh_entry is not None and k.end < 128 << 20
        assert m.read(k.entry, 16) != bytes(16)


def test_real_bzimage_loads_with_its_setup_header(guest_kernel):
    with GuestMemory(128 << 20) as m:
        image = open_kernel(str(guest_kernel.bzimage))
        assert image.kind == "bzimage" and image.cmdline_limit >= 2048
        k = load(image, m)
        assert k.entry == 0x100200 and k.setup_header[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    with GuestMemory(8 << 20) as small, pytest.raises(VoltError) as err:
        load(open_kernel(str(guest_kernel.bzimage)), small)
    assert err.value.exit_code == exitcodes.MEMORY


def _free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


def test_hugepages_map_or_fail_clearly_at_setup():
    """Huge pages fail at mmap time when none are reserved, never later with SIGBUS."""
    if _free_hugepages() >= 2:
        with GuestMemory(4 << 20, hugepages=True) as m:
            m.write(0x1000, b"x")
            assert m.read(0x1000, 1) == b"x"
    else:
        with pytest.raises(GuestMemoryError, match="huge pages"):
            GuestMemory(4 << 20, hugepages=True)
