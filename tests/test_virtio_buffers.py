"""Reader and Writer: a chain's buffers as one stream, windows onto guest memory, no
partial writes, and a status byte cut off the end (however the driver split things)."""

from __future__ import annotations

import struct

import pytest

from stellarium_core.virtio import ChainTooShort, Descriptor, Reader, RegionMemory, Writer
from stellarium_core.virtio.memory import GuestMemoryError, MemoryRegion

HDR = struct.Struct("<IIQ")


def ram() -> RegionMemory:
    return RegionMemory.over(bytearray(0x10000))


def readable(*parts: tuple[int, int]) -> list[Descriptor]:
    return [Descriptor(a, n, False) for a, n in parts]


def writable(*parts: tuple[int, int]) -> list[Descriptor]:
    return [Descriptor(a, n, True) for a, n in parts]


def test_reader_unpacks_a_header_split_anywhere_and_hands_out_windows() -> None:
    mem = ram()
    raw = HDR.pack(1, 0, 77) + b"payload!"
    mem.write(0x1000, raw[:5])                      # header split 5 | 11, payload after
    mem.write(0x2000, raw[5:16])
    mem.write(0x3000, raw[16:])
    r = Reader.of(mem, readable((0x1000, 5), (0x2000, 11), (0x3000, 8)))
    assert r.remaining == 24 and r.unpack(HDR) == (1, 0, 77)
    views = r.views()
    assert [bytes(v) for v in views] == [b"payload!"] and r.remaining == 0
    views[0][:1] = b"P"                             # a window, not a copy
    assert mem.read(0x3000, 8) == b"Payload!"
    with pytest.raises(ChainTooShort):
        r.read(1)


def test_reader_take_is_zero_copy_within_a_buffer_and_gathers_across() -> None:
    mem = ram()
    mem.write(0x100, b"abcdef")
    mem.write(0x200, b"ghij")
    r = Reader.of(mem, readable((0x100, 6), (0x200, 4)))
    first = r.take(4)
    assert isinstance(first, memoryview) and bytes(first) == b"abcd"
    assert r.take(4) == b"efgh" and r.remaining == 2
    buf = bytearray(2)
    assert r.readinto(buf) == 2 and buf == b"ij"


def test_writer_fills_across_buffers_and_refuses_overflow_whole() -> None:
    mem = ram()
    w = Writer.of(mem, writable((0x100, 3), (0x200, 0), (0x300, 5)))
    w.write_from([b"ab", memoryview(b"cdef"), b""])
    assert w.written == 6 and w.remaining == 2
    assert mem.read(0x100, 3) == b"abc" and mem.read(0x300, 3) == b"def"
    with pytest.raises(ChainTooShort):
        w.write(b"xyz")                             # 3 > 2 left: nothing written
    assert mem.read(0x303, 2) == b"\0\0" and w.written == 6
    w.pack(struct.Struct("<H"), 0xBEEF)
    assert mem.read(0x303, 2) == b"\xef\xbe" and w.remaining == 0


@pytest.mark.parametrize("parts", [
    [(0x100, 513)],                                 # status in the data buffer's last byte
    [(0x100, 512), (0x400, 1)],                     # status in its own buffer
    [(0x100, 100), (0x400, 0), (0x500, 413)],       # zero-length buffer in between
])
def test_split_tail_keeps_the_status_byte_out_of_reach(parts) -> None:
    mem = ram()
    w = Writer.of(mem, writable(*parts))
    status = w.split_tail(1)
    assert (w.remaining, status.remaining) == (512, 1)
    w.write(b"\x11" * 512)
    with pytest.raises(ChainTooShort):
        w.write(b"!")
    status.write(b"\x07")
    last_addr, last_len = [p for p in parts if p[1]][-1]
    assert mem.read(last_addr + last_len - 1, 1) == b"\x07"
    assert w.written == 512 and status.written == 1
    with pytest.raises(ChainTooShort):
        Writer.of(mem, writable((0x100, 0))).split_tail(1)


def test_writer_views_are_for_filling_in_place() -> None:
    mem = ram()
    w = Writer.of(mem, writable((0x100, 4), (0x200, 4)))
    views = w.views(6)
    assert [len(v) for v in views] == [4, 2] and w.written == 6
    views[1][:] = b"zz"
    assert mem.read(0x200, 2) == b"zz"


def test_region_memory_bounds_and_regions() -> None:
    mem = RegionMemory([(MemoryRegion(0, 0x1000, 0), memoryview(bytearray(0x1000))),
                        (MemoryRegion(0x10000, 0x1000, 0), memoryview(bytearray(0x1000)))])
    mem.write(0x10FFC, b"edge")
    assert mem.read(0x10FFC, 4) == b"edge" and mem.contains(0x10000, 0x1000)
    for addr, n in ((0xFFE, 4), (0x1000, 1), (0x10FFD, 4), (-1, 1), (0, -1)):
        with pytest.raises(GuestMemoryError):
            mem.view(addr, n)
    assert [r.guest_addr for r in mem.regions] == [0, 0x10000]
    assert not mem.regions[0].shareable
    with pytest.raises(ValueError, match="writable buffer"):
        RegionMemory([(MemoryRegion(0, 4, 0), memoryview(b"1234"))])


def test_writing_nothing_into_nothing_is_nothing() -> None:
    """A GET_ID whose chain has no room before its status byte writes b"" into an empty
    window (found by fuzzing the C request loop against this code)."""
    w = Writer([memoryview(b"")])
    w.write(b"")
    assert w.written == 0
