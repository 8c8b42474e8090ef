"""The virtio-mmio transport driven register by register, as Linux's driver does it."""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from volt.vmm import exitcodes
from volt.vmm.config import DeviceSpec, parse_device_option
from volt.vmm.devices import virtio_mmio as vm
from volt.vmm.devices.bus import Bus, BusConflict
from volt.vmm.devices.manager import create_devices
from volt.vmm.exitcodes import VoltError

from stellarium_core import config as config_mod
from stellarium_core.host import Host
from stellarium_core.virtio import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

sys.path.insert(0, str(Path(__file__).parent))
from virtio_rig import QSIZE, PlainEcho, Rig, wait_for  # noqa: E402


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_probe_negotiate_and_echo(rig):
    """Register by register, as Linux's virtio_mmio probes and sets up a device."""
    d = rig.plug(PlainEcho())
    mem = rig.mem
    assert d.r32(vm.MAGIC_VALUE) == 0x74726976
    assert d.r32(vm.VERSION_REG) == 2
    assert d.r32(vm.DEVICE_ID) == 0x7F
    d.w32(vm.STATUS, 1 | 2)
    d.w32(vm.DEVICE_FEATURES_SEL, 1)
    assert d.r32(vm.DEVICE_FEATURES) == 1          # VERSION_1 is bit 32
    d.w32(vm.DRIVER_FEATURES_SEL, 1)
    d.w32(vm.DRIVER_FEATURES, 1)
    d.w32(vm.STATUS, 1 | 2 | 8)
    assert d.r32(vm.STATUS) & 8
    d.w32(vm.QUEUE_SEL, 0)
    assert d.r32(vm.QUEUE_NUM_MAX) == QSIZE
    d.w32(vm.QUEUE_NUM, QSIZE)
    for reg, addr in ((vm.QUEUE_DESC_LOW, d.desc), (vm.QUEUE_DRIVER_LOW, d.avail),
                      (vm.QUEUE_DEVICE_LOW, d.used)):
        d.w32(reg, addr)
        d.w32(reg + 4, 0)
    d.w32(vm.QUEUE_READY, 1)
    d.w32(vm.STATUS, 1 | 2 | 8 | 4)
    assert rig.bus.read(d.base + 0x100, 4) == b"ECHO"
    mem.write(0x80000, b"hello virtio")
    mem.write(d.desc, struct.pack("<QIHH", 0x80000, 12, VIRTQ_DESC_F_NEXT, 1))
    mem.write(d.desc + 16, struct.pack("<QIHH", 0x81000, 64, VIRTQ_DESC_F_WRITE, 0))
    mem.write(d.avail + 4, struct.pack("<H", 0))
    mem.write(d.avail + 2, struct.pack("<H", 1))
    d.w32(vm.QUEUE_NOTIFY, 0)             # served by the I/O thread
    assert wait_for(lambda: d.irq.count)
    assert mem.read(0x81000, 12) == b"hello virtio"
    assert struct.unpack("<HHII", mem.read(d.used, 12)) == (0, 1, 0, 12)
    assert d.irq.count == 1 and d.r32(vm.INTERRUPT_STATUS) == vm.INT_VRING
    d.w32(vm.INTERRUPT_ACK, vm.INT_VRING)
    assert d.r32(vm.INTERRUPT_STATUS) == 0
    d.w32(vm.STATUS, 0)
    assert d.r32(vm.STATUS) == 0 and d.r32(vm.QUEUE_READY) == 0


def test_ring_outside_guest_memory_needs_reset(rig):
    d = rig.plug(PlainEcho())
    d.w32(vm.DRIVER_FEATURES_SEL, 1)
    d.w32(vm.DRIVER_FEATURES, 1)
    d.w32(vm.QUEUE_DESC_LOW, 0xFFFF0000)
    d.w32(vm.QUEUE_READY, 1)
    d.w32(vm.STATUS, 1 | 2 | 8 | 4)
    assert d.r32(vm.STATUS) & 64


def test_bus_rejects_overlap_and_unclaimed_reads_are_all_ones():
    bus = Bus("pio")
    bus.add(0x3F8, 8, PlainEcho())   # any object: only the range matters here
    with pytest.raises(BusConflict):
        bus.add(0x3FC, 8, PlainEcho())
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
