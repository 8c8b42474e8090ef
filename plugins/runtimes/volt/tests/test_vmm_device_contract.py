"""The device contract as Volt's transport serves it: host fds on the I/O thread's loop
(changeable while it runs), NEEDS_RESET, config-change interrupts, queue handover as
eventfds, EVENT_IDX, and what happens when a device misbehaves. A device written to
today's plain VirtioDevice Protocol keeps working alongside."""

from __future__ import annotations

import logging
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from volt.vmm.devices import virtio_mmio as vm
from volt.vmm.devices.event_loop import EventLoop

from stellarium_core.virtio import (
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    DeviceLink,
    LinkedDevice,
    QueueEventfds,
    VirtioDevice,
)

sys.path.insert(0, str(Path(__file__).parent))
from virtio_rig import QSIZE, PlainEcho, Rig, wait_for  # noqa: E402


class Linked(PlainEcho):
    """An echo device that also takes the DeviceLink."""

    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX

    def __init__(self) -> None:
        super().__init__()
        self.link: DeviceLink | None = None
        self.fail_notify = False

    def attach(self, link: DeviceLink) -> None:
        self.link = link

    def notify(self, queue: int) -> None:
        if self.fail_notify:
            raise RuntimeError("backend went away")
        super().notify(queue)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def test_a_plain_virtio_device_still_works_beside_a_linked_one(rig: Rig) -> None:
    plain, linked = PlainEcho(), Linked()
    a, b = rig.plug(plain), rig.plug(linked)
    assert isinstance(plain, VirtioDevice) and not isinstance(plain, LinkedDevice)
    assert isinstance(linked, LinkedDevice) and linked.link is b.transport
    for drv in (a, b):
        drv.init()
        drv.offer(b"ping")
    assert wait_for(lambda: a.used_idx() == 1 and b.used_idx() == 1)
    assert a.reply(0) == b.reply(0) == b"ping"
    assert a.r32(vm.INTERRUPT_STATUS) == vm.INT_VRING and a.irq.count == 1


def test_device_fds_are_served_and_changeable_while_the_loop_runs(rig: Rig) -> None:
    dev = Linked()
    rig.plug(dev)
    link = dev.link
    assert link is not None
    r, w = os.pipe()
    rig.fds += [r, w]
    os.set_blocking(r, False)
    seen: list[bytes] = []
    link.loop.add(r, lambda ev: seen.append(os.read(r, 100)))   # added while polling
    with pytest.raises(ValueError, match="already registered"):
        link.loop.add(r, lambda ev: None)
    os.write(w, b"tap frame")
    assert wait_for(lambda: seen == [b"tap frame"])
    link.loop.modify(r, 0)                        # paused: data stays unread
    os.write(w, b"later")
    time.sleep(0.1)
    assert seen == [b"tap frame"]
    link.loop.modify(r, select.EPOLLIN)
    assert wait_for(lambda: seen == [b"tap frame", b"later"])
    link.loop.remove(r)
    with pytest.raises(ValueError, match="not registered"):
        link.loop.remove(r)
    os.write(w, b"ignored")
    time.sleep(0.1)
    assert seen == [b"tap frame", b"later"]


def test_a_raising_fd_callback_marks_needs_reset_and_the_rest_carries_on(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    bad, good = Linked(), Linked()
    drv_bad, drv_good = rig.start(bad), rig.start(good)
    efd = rig.eventfd()
    calls: list[int] = []

    def boom(ev: int) -> None:
        calls.append(ev)
        raise OSError("tap vanished")

    with caplog.at_level(logging.ERROR):
        assert bad.link is not None
        bad.link.loop.add(efd, boom)
        os.eventfd_write(efd, 1)
        assert wait_for(lambda: drv_bad.r32(vm.STATUS) & STATUS_NEEDS_RESET)
    assert "dev0 needs a reset: callback for fd" in caplog.text and "tap vanished" in caplog.text
    assert drv_bad.r32(vm.INTERRUPT_STATUS) & vm.INT_CONFIG and drv_bad.irq.count == 1
    os.eventfd_write(efd, 1)                      # removed from the loop: not called again
    time.sleep(0.1)
    assert len(calls) == 1
    drv_good.offer(b"still here")                 # the other device is served
    assert wait_for(lambda: drv_good.used_idx() == 1) and drv_good.reply(0) == b"still here"


def test_needs_reset_stops_requests_until_the_driver_resets(rig: Rig) -> None:
    dev = Linked()
    drv = rig.start(dev)
    drv.offer(b"one")
    assert wait_for(lambda: drv.used_idx() == 1)
    gen = drv.r32(vm.CONFIG_GENERATION)
    assert dev.link is not None
    dev.link.needs_reset("volume went read-only")
    assert drv.r32(vm.STATUS) & STATUS_NEEDS_RESET
    assert drv.r32(vm.INTERRUPT_STATUS) & vm.INT_CONFIG
    drv.w32(vm.STATUS, drv.r32(vm.STATUS) | 4)    # the driver cannot clear it by itself
    assert drv.r32(vm.STATUS) & STATUS_NEEDS_RESET
    drv.offer(b"two")
    time.sleep(0.1)
    assert drv.used_idx() == 1 and dev.notified == 1      # not served
    assert drv.r32(vm.CONFIG_GENERATION) == gen
    drv.init()                                    # reset + re-initialise
    assert not drv.r32(vm.STATUS) & STATUS_NEEDS_RESET
    drv.offer(b"three")
    assert wait_for(lambda: drv.used_idx() == 1) and drv.reply(0) == b"three"


def test_a_raising_notify_marks_needs_reset_not_a_dead_vm(rig: Rig) -> None:
    dev = Linked()
    drv = rig.start(dev)
    dev.fail_notify = True
    drv.offer(b"x")
    assert wait_for(lambda: drv.r32(vm.STATUS) & STATUS_NEEDS_RESET)
    dev.fail_notify = False
    drv.init()
    drv.offer(b"y")
    assert wait_for(lambda: drv.used_idx() == 1) and drv.reply(0) == b"y"


def test_config_change_interrupt_bumps_the_generation(rig: Rig) -> None:
    dev = Linked()
    drv = rig.start(dev)
    gen = drv.r32(vm.CONFIG_GENERATION)
    assert dev.link is not None
    dev.link.config_changed()
    assert drv.r32(vm.CONFIG_GENERATION) == gen + 1
    assert drv.r32(vm.INTERRUPT_STATUS) == vm.INT_CONFIG and drv.irq.count == 1
    drv.w32(vm.INTERRUPT_ACK, vm.INT_CONFIG)
    assert drv.r32(vm.INTERRUPT_STATUS) == 0


def test_a_queue_handed_over_as_eventfds_is_served_without_the_vmm(rig: Rig) -> None:
    dev = Linked()
    drv = rig.start(dev)
    assert dev.link is not None
    fds = dev.link.queue_eventfds(0)
    assert isinstance(fds, QueueEventfds) and fds.call == drv.irq.fd
    assert dev.link.queue_eventfds(0) == fds                  # idempotent
    # The "backend": reads the kick the guest's notify writes, serves the ring itself.
    drv.offer(b"via backend")
    assert wait_for(lambda: _readable(fds.kick))
    assert os.eventfd_read(fds.kick) == 1 and dev.notified == 0   # the VMM stayed out
    # An irqfd raises the interrupt without the transport; the used-ring bit stays set
    # so the guest's handler looks at its rings.
    assert drv.r32(vm.INTERRUPT_STATUS) == vm.INT_VRING
    drv.w32(vm.INTERRUPT_ACK, vm.INT_VRING)
    assert drv.r32(vm.INTERRUPT_STATUS) == vm.INT_VRING
    with pytest.raises(ValueError, match="no queue 3"):
        dev.link.queue_eventfds(3)


def test_handover_without_irqfd_is_refused_clearly(rig: Rig) -> None:
    dev = Linked()
    rig.plug(dev, irqfd=False)
    assert dev.link is not None
    with pytest.raises(RuntimeError, match="no irqfd"):
        dev.link.queue_eventfds(0)


def test_event_idx_suppresses_kicks_and_interrupts_as_the_driver_asks(rig: Rig) -> None:
    dev = Linked()
    drv = rig.start(dev, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX)
    mem = rig.mem
    avail_event = drv.used + 4 + 8 * QSIZE
    used_event = drv.avail + 4 + 2 * QSIZE
    mem.write(used_event, struct.pack("<H", 1))   # "interrupt me once 2 are used"
    drv.offer(b"a")
    assert wait_for(lambda: drv.used_idx() == 1)
    # The ring ran empty: the device asks to be kicked for the next index.
    assert struct.unpack("<H", mem.read(avail_event, 2))[0] == 1
    time.sleep(0.05)
    assert drv.irq.count == 0                     # used_event 1 not passed yet
    drv.offer(b"b")
    assert wait_for(lambda: drv.used_idx() == 2) and wait_for(lambda: drv.irq.count == 1)
    assert drv.reply(1) == b"b"


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_event_loop_rejects_double_registration_and_survives_a_raising_callback(
        caplog: pytest.LogCaptureFixture) -> None:
    loop = EventLoop()
    io = threading.Thread(target=loop.run, daemon=True)
    io.start()
    a = os.eventfd(0, os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_NONBLOCK)
    got: list[int] = []
    try:
        loop.add(a, lambda ev: (_ for _ in ()).throw(KeyError("bug")))
        with pytest.raises(ValueError, match=f"fd {a} is already registered"):
            loop.add(a, lambda ev: None)
        with pytest.raises(ValueError, match="not registered"):
            loop.modify(b, select.EPOLLIN)
        loop.add(b, lambda ev: got.append(os.eventfd_read(b)))
        with caplog.at_level(logging.ERROR):
            os.eventfd_write(a, 1)
            assert wait_for(lambda: a not in loop)
        assert "callback for fd" in caplog.text
        os.eventfd_write(b, 3)
        assert wait_for(lambda: got == [3])
    finally:
        loop.stop()
        io.join(10)
        loop.close()
        os.close(a)
        os.close(b)
    assert not io.is_alive()
