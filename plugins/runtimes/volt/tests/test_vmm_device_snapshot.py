"""Device state across a snapshot: the virtio-mmio transport, the device manager, the
serial port and the i8042, saved mid-use and restored into fresh ones over the same
guest memory, and refused clearly when the saved state is corrupt or for other devices."""

from __future__ import annotations

import json
import os
import select
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from volt.vmm import exitcodes
from volt.vmm.devices import virtio_mmio as vm
from volt.vmm.devices.i8042 import I8042
from volt.vmm.devices.manager import DeviceManager
from volt.vmm.devices.serial import IER, LCR, LSR, Serial
from volt.vmm.exitcodes import VoltError

from stellarium_core.virtio import STATUS_NEEDS_RESET, StateError

sys.path.insert(0, str(Path(__file__).parent))
from virtio_rig import Driver, Irq, PlainEcho, Rig, wait_for  # noqa: E402


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


class StatefulEcho(PlainEcho):
    """An echo device with a counter of its own, and what restore_state saw."""

    def __init__(self) -> None:
        super().__init__()
        self.served = 0
        self.restored_active: bool | None = None

    def notify(self, queue: int) -> None:
        self.served += 1
        super().notify(queue)

    def save_state(self) -> bytes:
        return json.dumps({"served": self.served}).encode()

    def restore_state(self, data: bytes) -> None:
        self.restored_active = self.ctx is not None
        self.served = json.loads(data)["served"]


def twin(rig: Rig, drv: Driver, device: object) -> Driver:
    """A second transport whose driver uses ``drv``'s rings (the same guest memory)."""
    new = rig.plug(device)
    new.desc, new.avail, new.used, new.data = drv.desc, drv.avail, drv.used, drv.data
    new.avail_idx = drv.avail_idx
    return new


def test_a_transport_restored_mid_use_serves_the_next_request_in_order(rig):
    """An older device (no save_state) round-trips through the transport state alone."""
    drv = rig.start(PlainEcho())
    for n in range(2):
        drv.offer(f"hello {n}".encode())
    assert wait_for(lambda: drv.used_idx() == 2)
    drv.w32(vm.QUEUE_SEL, 0)
    saved = json.loads(json.dumps(drv.transport.save()))
    assert saved["device_state"] is None and saved["kind"] == "virtio_rig.PlainEcho"
    new = twin(rig, drv, PlainEcho())
    new.transport.restore(saved)
    assert new.r32(vm.STATUS) == drv.r32(vm.STATUS) and new.r32(vm.QUEUE_READY) == 1
    assert new.transport.device.ctx is not None          # activated without the guest
    new.offer(b"after restore")
    assert wait_for(lambda: new.used_idx() == 3)
    assert new.reply(2) == b"after restore"


def test_a_request_the_snapshot_caught_unserved_is_served_after_restore(rig):
    drv = rig.start(PlainEcho())
    drv.offer(b"first")
    assert wait_for(lambda: drv.used_idx() == 1)
    drv.offer(b"never kicked", kick=False)
    saved = drv.transport.save()
    new = twin(rig, drv, PlainEcho())
    new.transport.restore(saved)
    assert wait_for(lambda: new.used_idx() == 2)
    assert new.reply(1) == b"never kicked"


def test_a_stateful_device_gets_its_state_back_after_activation(rig):
    drv = rig.start(StatefulEcho())
    drv.offer(b"x")
    assert wait_for(lambda: drv.transport.device.served == 1)
    saved = drv.transport.save()
    dev = StatefulEcho()
    twin(rig, drv, dev).transport.restore(saved)
    assert dev.restored_active is True and dev.served >= 1


def test_interrupt_status_and_selectors_are_restored(rig):
    drv = rig.start(PlainEcho())
    drv.offer(b"x")
    assert wait_for(lambda: drv.r32(vm.INTERRUPT_STATUS) == vm.INT_VRING)
    drv.w32(vm.DEVICE_FEATURES_SEL, 1)
    new = twin(rig, drv, PlainEcho())
    new.transport.restore(drv.transport.save())
    assert new.r32(vm.INTERRUPT_STATUS) & vm.INT_VRING
    assert new.r32(vm.DEVICE_FEATURES) == 1              # word 1 selected: VERSION_1


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s["state"]["queues"][0].update(size=3), "queue 0: virtqueue: size 3"),
    (lambda s: s["state"]["queues"][0].update(used_addr=1 << 40), "outside guest memory"),
    (lambda s: s.update(extra=1), "unknown extra"),
    (lambda s: s.pop("queue_sel"), "missing queue_sel"),
    (lambda s: s["state"].pop("status"), "missing status"),
    (lambda s: s.update(device_type=2), "virtio type 2"),
    (lambda s: s.update(device_state="%%%"), "not base64"),
    (lambda s: s.update(interrupt_status=8), "interrupt_status must be"),
])
def test_a_corrupt_transport_state_is_a_clear_error_and_changes_nothing(rig, corrupt, message):
    drv = rig.start(PlainEcho())
    saved = json.loads(json.dumps(drv.transport.save()))
    corrupt(saved)
    new = twin(rig, drv, PlainEcho())
    with pytest.raises(StateError, match=message):
        new.transport.restore(saved)
    assert new.r32(vm.STATUS) == 0 and new.transport.device.ctx is None


def test_state_for_a_stateful_device_is_refused_by_one_without_restore_state(rig):
    drv = rig.start(StatefulEcho())
    saved = drv.transport.save()
    saved["kind"] = "virtio_rig.PlainEcho"
    with pytest.raises(StateError, match="cannot take it"):
        twin(rig, drv, PlainEcho()).transport.restore(saved)


def test_a_device_waiting_for_reset_stays_so(rig):
    drv = rig.start(PlainEcho())
    drv.transport.needs_reset("test")
    new = twin(rig, drv, PlainEcho())
    new.transport.restore(drv.transport.save())
    assert new.r32(vm.STATUS) & STATUS_NEEDS_RESET and new.transport.device.ctx is None


class Watcher(PlainEcho):
    """A linked device with one host fd of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.events = 0

    def attach(self, link) -> None:
        link.loop.add(self.fd, self._ready, select.EPOLLIN)

    def _ready(self, _ev: int) -> None:
        os.eventfd_read(self.fd)
        self.events += 1


def test_quiesce_holds_back_kicks_and_fd_events_until_resume(rig):
    dev = Watcher()
    drv = rig.start(dev)
    t = drv.transport
    assert rig.loop.call(t.quiesce) == 0
    drv.offer(b"held")
    os.eventfd_write(dev.fd, 1)
    assert not wait_for(lambda: drv.used_idx() or dev.events, timeout=0.3)
    rig.loop.call(t.resume)
    assert wait_for(lambda: drv.used_idx() == 1 and dev.events == 1)
    assert drv.reply(0) == b"held"
    os.close(dev.fd)


class FakeMachine:
    """What DeviceManager.attach uses of a Machine: the rig's bus, memory and loop (its
    transports then sit where the rig's drivers look)."""

    def __init__(self, rig: Rig) -> None:
        self.rig, self.mem, self.loop, self.mmio = rig, rig.mem, rig.loop, rig.bus
        self.fast_reads: list = []

    def ioeventfd(self, addr: int, length: int, datamatch: int) -> None:
        return None

    def eventfd(self) -> int:
        return self.rig.eventfd()

    def interrupt(self, gsi: int) -> Irq:
        irq = Irq(self.rig.eventfd())
        self.rig.irqs.append(irq)
        return irq

    def map_memory(self, name: str, addr: int, size: int, readonly: bool) -> int:
        raise RuntimeError("no machine")


def manager(rig: Rig, *devices: tuple[str, object]) -> DeviceManager:
    m = DeviceManager(FakeMachine(rig))      # type: ignore[arg-type]
    for ident, dev in devices:
        rig.transports.append(m.attach(ident, dev))
    return m


@pytest.fixture
def rig2() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.mark.parametrize("other, message", [
    ((("a", PlainEcho()), ("c", PlainEcho())), r"made for devices \['a', 'b'\], this VM "
                                               r"has \['a', 'c'\]"),
    ((("b", PlainEcho()), ("a", PlainEcho())), "made for devices"),
    ((("a", PlainEcho()),), "made for devices"),
    ((("a", PlainEcho()), ("b", StatefulEcho())), "device b was a virtio_rig.PlainEcho"),
])
def test_a_snapshot_for_another_device_set_is_refused_before_anything_changes(
        rig, rig2, other, message):
    src = manager(rig, ("a", PlainEcho()), ("b", PlainEcho()))
    Driver(rig, 0).init()
    saved = json.loads(json.dumps(src.save()))
    dst = manager(rig2, *other)
    before = [t.save() for t in dst.transports.values()]
    with pytest.raises(VoltError, match=message) as err:
        dst.restore(saved)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    assert [t.save() for t in dst.transports.values()] == before


def test_a_vm_restored_by_the_manager_carries_on_and_a_corrupt_device_is_named(rig, rig2):
    """Snapshot: quiesce, save, copy guest memory; the restored VM serves the next request."""
    src = manager(rig, ("a", PlainEcho()), ("b", StatefulEcho()))
    drivers = [Driver(rig, i) for i in range(2)]
    for d in drivers:
        d.init()
        d.offer(b"before")
    assert wait_for(lambda: all(d.used_idx() == 1 for d in drivers))
    rig.loop.call(lambda: src.quiesce(1.0))
    saved = json.loads(json.dumps(rig.loop.call(src.save)))
    rig.loop.call(src.resume)
    assert [e["id"] for e in saved["devices"]] == ["a", "b"]
    rig2.mem.write(0, rig.mem.read(0, 4 << 20))
    dst = manager(rig2, ("a", PlainEcho()), ("b", StatefulEcho()))
    dst.restore(saved)
    assert dst.transports["b"].device.served == 1
    for i, d in enumerate(drivers):
        again = Driver(rig2, i)
        again.avail_idx = d.avail_idx
        again.offer(b"after")
        assert wait_for(lambda again=again: again.used_idx() == 2)
        assert again.reply(1) == b"after"
    saved["devices"][1]["transport"]["state"]["queues"][0]["size"] = 3
    with pytest.raises(VoltError, match="device b: queue 0: virtqueue: size 3") as err:
        dst.restore(saved)
    assert err.value.exit_code == exitcodes.SNAPSHOT
    with pytest.raises(VoltError, match="device snapshot: missing devices"):
        dst.restore({})


class Busy(PlainEcho):
    """A device whose requests run elsewhere: ``pending`` still in flight."""

    def __init__(self, pending: int) -> None:
        super().__init__()
        self.pending, self.resumed = pending, 0

    def quiesce(self) -> int:
        return self.pending

    def resume(self) -> None:
        self.resumed += 1


def test_quiesce_waits_for_requests_in_flight_and_names_a_busy_device(rig):
    busy = Busy(2)
    m = manager(rig, ("idle", PlainEcho()), ("disk", busy))
    with pytest.raises(VoltError, match="device disk still has 2 request") as err:
        rig.loop.call(lambda: m.quiesce(0.05))
    assert err.value.exit_code == exitcodes.SNAPSHOT and busy.resumed == 1
    assert not any(t._events.paused for t in m.transports.values())
    busy.pending = 0
    rig.loop.call(lambda: m.quiesce(0.05))
    assert all(t._events.paused for t in m.transports.values())
    rig.loop.call(m.resume)
    assert busy.resumed == 2


def test_quiesce_refuses_handed_over_queues_it_cannot_stop(rig):
    m = manager(rig, ("net", PlainEcho()))
    t = m.transports["net"]
    t.queue_eventfds(0)
    with pytest.raises(VoltError, match="device net: its queues are served outside"):
        rig.loop.call(lambda: m.quiesce(1))
    assert not t._events.paused


def test_serial_round_trip_keeps_registers_and_unread_input():
    irqs = []
    s = Serial(lambda b: None, lambda: irqs.append(1))
    s.write(IER, b"\x01")
    s.write(LCR, b"\x1b")
    assert s.input(b"typed") == 5
    saved = json.loads(json.dumps(s.save()))
    t = Serial(lambda b: None, lambda: irqs.append(2))
    t.restore(saved)
    assert t.read(LCR, 1) == b"\x1b" and t.read(LSR, 1)[0] & 1
    assert bytes(t.read(0, 1)[0] for _ in range(5)) == b"typed"
    assert 2 not in irqs                       # a pending interrupt is the irqchip's
    for bad, message in (({**saved, "rx": "!"}, "not base64"),
                         ({**saved, "ier": 0x10}, "ier must be"),
                         ({k: v for k, v in saved.items() if k != "mcr"}, "missing mcr")):
        with pytest.raises(StateError, match=message):
            t.restore(bad)


def test_i8042_round_trip_keeps_the_output_buffer_and_a_pending_command():
    k = I8042(lambda: None)
    k.write(4, bytes([0x20]))                  # read the control byte: a reply waits
    k.write(0, bytes([0xED]))                  # set LEDs: ACK, then the argument is awaited
    saved = json.loads(json.dumps(k.save()))
    n = I8042(lambda: None)
    n.restore(saved)
    assert n.read(4, 1)[0] & 1
    assert n.read(0, 1)[0] == k.ctr and n.read(0, 1)[0] == 0xFA
    n.write(0, bytes([5]))                     # the LED argument
    assert n.leds == 5
    for bad, message in (({**saved, "out": [[256, True]]}, "out must be"),
                         ({**saved, "kbd_pending": 0x42}, "kbd_pending must be one of"),
                         ({**saved, "scancode_set": 4}, "scancode_set must be")):
        with pytest.raises(StateError, match=message):
            n.restore(bad)
