"""Shareable guest memory: a memfd mapped MAP_SHARED that another process maps and sees
the guest's writes in (and the guest sees its writes); the region layout around the MMIO
gap; KSM marking; huge pages failing clearly at start."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from volt.vmm import exitcodes
from volt.vmm.memory import MMIO_GAP_END, MMIO_GAP_START, GuestMemory
from volt.vmm.runner import Runner

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, real_mode_machine  # noqa: E402

#: mov byte [0x2000..0x2003], "VOLT"; spin until [0x2100] != 0; mov al,0xfe; out 0x64,al
WRITE_THEN_WAIT = bytes.fromhex(
    "c606002056" "c60601204f" "c60602204c" "c606032054"
    "803e002100" "74f9"
    "b0fee664" "f4")

PEER = textwrap.dedent("""
    import mmap, sys, time
    fd, offset, addr = (int(a, 0) for a in sys.argv[1:4])
    m = mmap.mmap(fd, 0x10000, mmap.MAP_SHARED, offset=offset)
    deadline = time.monotonic() + 60
    while m[addr:addr + 4] != b"VOLT" and time.monotonic() < deadline:
        time.sleep(0.01)
    print(m[addr:addr + 4].decode(errors="replace"), flush=True)
    m[addr + 0x100] = 1          # tell the guest to go on
""")


def peer(fd: int, offset: int, addr: int) -> subprocess.Popen:
    """Another process that maps the memfd at ``offset`` and watches ``addr`` in it."""
    return subprocess.Popen([sys.executable, "-c", PEER, str(fd), hex(offset), hex(addr)],
                            pass_fds=[fd], stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
def test_another_process_maps_guest_ram_and_sees_guest_writes() -> None:
    m = real_mode_machine(WRITE_THEN_WAIT, lambda b: None)
    (region,) = m.mem.regions
    assert region.shareable and region.fd == m.mem.fd and region.fd_offset == 0
    p = peer(region.fd, 0, 0x2000)
    r = Runner(m)
    r.start()
    # The guest spins until the peer's write reaches it through the shared pages.
    assert r.wait(120) == exitcodes.OK and m.exit_reason == "guest reset"
    out, _ = p.communicate(timeout=60)
    assert out.strip() == "VOLT" and p.returncode == 0
    assert m.mem.read(0x2100, 1) == b"\x01"
    m.close()


def test_memory_above_the_mmio_gap_is_the_same_memfd_at_its_offset() -> None:
    size = MMIO_GAP_START + (64 << 20)
    with GuestMemory(size) as mem:
        low, high = mem.regions
        assert (low.guest_addr, low.size, low.fd_offset) == (0, MMIO_GAP_START, 0)
        assert (high.guest_addr, high.size) == (MMIO_GAP_END, 64 << 20)
        assert high.fd == low.fd and high.fd_offset == MMIO_GAP_START
        mem.write(MMIO_GAP_END + 0x3000, b"VOLT")
        p = peer(high.fd, high.fd_offset, 0x3000)
        out, _ = p.communicate(timeout=60)
        assert out.strip() == "VOLT"
        assert mem.read(MMIO_GAP_END + 0x3100, 1) == b"\x01"
        assert not mem.contains(MMIO_GAP_START, 1)


def test_ksm_memory_is_private_and_marked_mergeable() -> None:
    with GuestMemory(8 << 20, ksm=True) as mem:
        (region,) = mem.regions
        assert not region.shareable and region.fd == -1
        mem.write(0x1000, b"x")
        assert "mg" in _vm_flags(region.host_addr)
    with GuestMemory(8 << 20) as shared:
        assert "mg" not in _vm_flags(shared.regions[0].host_addr)
        assert "sh" in _vm_flags(shared.regions[0].host_addr)


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping starting at ``addr`` in /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            inside = int(head.split("-")[0], 16) == addr
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping at {addr:#x}")


def test_closing_memory_a_device_still_views_never_leaves_a_dangling_window() -> None:
    mem = GuestMemory(1 << 20)
    window = mem.view(0x1000, 4)
    window[:] = b"kept"
    mem.close()
    assert bytes(window) == b"kept"      # the mapping outlives the window, not the reverse


def test_ksm_and_hugepages_together_are_refused() -> None:
    from volt.vmm.memory import GuestMemoryError

    with pytest.raises(GuestMemoryError, match="KSM cannot merge huge pages"):
        GuestMemory(4 << 20, hugepages=True, ksm=True)
    with pytest.raises(GuestMemoryError, match="multiple of the 2048 KiB"):
        GuestMemory(3 << 20, hugepages=True)


@pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
def test_a_ksm_machine_hands_kvm_mergeable_private_memory() -> None:
    from volt.vmm.vm import Machine

    m = Machine(8 << 20, ksm=True)
    try:
        (region,) = m.mem.regions
        assert region.fd == -1 and "mg" in _vm_flags(region.host_addr)
    finally:
        m.close()


@pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))
def test_device_memory_gets_slots_above_ram_and_drops_the_guests_stores() -> None:
    """What virtio-pmem's window asks of the machine: its own slot at a hot-pluggable
    boundary above RAM and the 32-bit gap; with ``readonly``, a guest store into it (a
    KVM MMIO exit) is dropped and counted, never written."""
    import ctypes
    import mmap

    from volt.vmm import layout
    from volt.vmm.vm import Machine

    m = Machine(8 << 20)
    window = mmap.mmap(-1, 4 << 20)
    window[:4] = b"BASE"
    host = ctypes.addressof(ctypes.c_char.from_buffer(window))
    try:
        first = m.map_memory("pmem0", host, 4 << 20, readonly=True)
        second = m.map_memory("pmem1", host, 2 << 20, readonly=False)
        assert first == MMIO_GAP_END                              # above RAM and the gap
        assert second == first + layout.DEVICE_MEMORY_ALIGN       # the next boundary
        assert m.mmio.write(first + 2, b"xx")                    # the exit KVM would make
        assert window[:4] == b"BASE" and m.dropped_stores["pmem0"].count == 1
        assert not m.mmio.write(second, b"x")                     # writable: no exit, no sink
        with pytest.raises(ValueError, match="whole pages"):
            m.map_memory("odd", host, 4097, readonly=True)
    finally:
        m.close()
        del host
        window.close()
