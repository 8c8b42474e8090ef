"""The virtio-mmio transport driven register by register, as Linux's driver does it."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from volt.vmm import exitcodes
from volt.vmm.config import DeviceSpec, parse_device_option
from volt.vmm.devices import virtio_mmio as vm
from volt.vmm.devices.bus import Bus, BusConflict
from volt.vmm.devices.event_loop import EventLoop
from volt.vmm.devices.manager import create_devices
from volt.vmm.exitcodes import VoltError
from volt.vmm.memory import GuestMemory

from stellarium_core import config as config_mod
from stellarium_core.host import Host
from stellarium_core.virtio import VIRTIO_F_VERSION_1, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

BASE = 0xD0000000
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000


class Echo:
    """Test device: copies each request's readable bytes into its writable buffers."""

    device_id = 0x7F
    features = VIRTIO_F_VERSION_1
    queue_sizes = (16,)

    def __init__(self) -> None:
        self.ctx = None

    def read_config(self, offset: int, size: int) -> bytes:
        return b"ECHOCONF"[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features, mem, queues, interrupt) -> None:
        self.ctx = (mem, queues, interrupt)

    def notify(self, queue: int) -> None:
        mem, queues, interrupt = self.ctx
        q = queues[queue]
        for chain in q.drain(mem):
            q.add_used(mem, chain.head, chain.write_all(mem, chain.read_all(mem)))
        interrupt()

    def reset(self) -> None:
        self.ctx = None


@pytest.fixture
def setup():
    """The transport on a bus, with the I/O thread's loop running as in a VM."""
    mem = GuestMemory(1 << 20)
    irqs: list[int] = []
    bus = Bus("mmio")
    loop = EventLoop()
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    t = vm.VirtioMmio(Echo(), mem, lambda: irqs.append(1), loop, [kick])
    bus.add(BASE, 0x1000, t)
    io = threading.Thread(target=loop.run, daemon=True)
    io.start()
    yield mem, bus, irqs
    loop.stop()
    io.join(10)
    loop.close()
    os.close(kick)
    mem.close()


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def r32(bus: Bus, off: int) -> int:
    return struct.unpack("<I", bus.read(BASE + off, 4))[0]


def w32(bus: Bus, off: int, v: int) -> None:
    bus.write(BASE + off, struct.pack("<I", v))


def test_probe_negotiate_and_echo(setup):
    mem, bus, irqs = setup
    assert r32(bus, vm.MAGIC_VALUE) == 0x74726976
    assert r32(bus, vm.VERSION_REG) == 2
    assert r32(bus, vm.DEVICE_ID) == 0x7F
    w32(bus, vm.STATUS, 1 | 2)
    w32(bus, vm.DEVICE_FEATURES_SEL, 1)
    assert r32(bus, vm.DEVICE_FEATURES) == 1          # VERSION_1 is bit 32
    w32(bus, vm.DRIVER_FEATURES_SEL, 1)
    w32(bus, vm.DRIVER_FEATURES, 1)
    w32(bus, vm.STATUS, 1 | 2 | 8)
    assert r32(bus, vm.STATUS) & 8
    w32(bus, vm.QUEUE_SEL, 0)
    assert r32(bus, vm.QUEUE_NUM_MAX) == 16
    w32(bus, vm.QUEUE_NUM, 16)
    for reg, addr in ((vm.QUEUE_DESC_LOW, DESC), (vm.QUEUE_DRIVER_LOW, AVAIL),
                      (vm.QUEUE_DEVICE_LOW, USED)):
        w32(bus, reg, addr)
        w32(bus, reg + 4, 0)
    w32(bus, vm.QUEUE_READY, 1)
    w32(bus, vm.STATUS, 1 | 2 | 8 | 4)
    assert bus.read(BASE + 0x100, 4) == b"ECHO"
    mem.write(0x20000, b"hello virtio")
    mem.write(DESC, struct.pack("<QIHH", 0x20000, 12, VIRTQ_DESC_F_NEXT, 1))
    mem.write(DESC + 16, struct.pack("<QIHH", 0x21000, 64, VIRTQ_DESC_F_WRITE, 0))
    mem.write(AVAIL + 4, struct.pack("<H", 0))
    mem.write(AVAIL + 2, struct.pack("<H", 1))
    w32(bus, vm.QUEUE_NOTIFY, 0)             # served by the I/O thread
    assert wait_for(lambda: irqs)
    assert mem.read(0x21000, 12) == b"hello virtio"
    assert struct.unpack("<HHII", mem.read(USED, 12)) == (0, 1, 0, 12)
    assert irqs == [1] and r32(bus, vm.INTERRUPT_STATUS) == vm.INT_VRING
    w32(bus, vm.INTERRUPT_ACK, vm.INT_VRING)
    assert r32(bus, vm.INTERRUPT_STATUS) == 0
    w32(bus, vm.STATUS, 0)
    assert r32(bus, vm.STATUS) == 0 and r32(bus, vm.QUEUE_READY) == 0


def test_ring_outside_guest_memory_needs_reset(setup):
    _mem, bus, _irqs = setup
    w32(bus, vm.DRIVER_FEATURES_SEL, 1)
    w32(bus, vm.DRIVER_FEATURES, 1)
    w32(bus, vm.QUEUE_DESC_LOW, 0xFFFF0000)
    w32(bus, vm.QUEUE_READY, 1)
    w32(bus, vm.STATUS, 1 | 2 | 8 | 4)
    assert r32(bus, vm.STATUS) & 64


def test_bus_rejects_overlap_and_unclaimed_reads_are_all_ones():
    bus = Bus("pio")
    bus.add(0x3F8, 8, Echo())   # any object: only the range matters here
    with pytest.raises(BusConflict):
        bus.add(0x3FC, 8, Echo())
    assert bus.read(0x80, 1) == b"\xff"


@pytest.mark.parametrize("spec", ["", "x,novalue", "x,=1"])
def test_malformed_device_option(spec):
    with pytest.raises(VoltError) as err:
        parse_device_option(spec)
    assert err.value.exit_code == exitcodes.DEVICE


def test_unknown_device_name_is_a_device_error():
    with pytest.raises(VoltError) as err:
        create_devices([DeviceSpec("no-such-device", {}, "d0")], Host(config_mod.parse({})))
    assert err.value.exit_code == exitcodes.DEVICE
    assert "no-such-device" in str(err.value)
