"""Saving and restoring virtqueues and the transport-independent device state: what a VM
snapshot carries for every device, checked as the untrusted input it is."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from stellarium_core.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceState,
    QuiescingDevice,
    StateError,
    StatefulDevice,
    Virtqueue,
)

sys.path.insert(0, str(Path(__file__).parent))
from test_virtio_queue import (  # noqa: E402
    AVAIL,
    DESC,
    SIZE,
    USED,
    Driver,
    EchoDevice,
    guest_ram,
    ready_queue,
)

LIVE = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


def echo(drv: Driver, n: int, payload: bytes) -> None:
    """Request ``n`` of the driver: ``payload`` out through descriptor pair 2n, 2n+1."""
    d = (2 * n) % SIZE
    drv.mem.write(0x5000 + 0x100 * n, payload)
    drv.desc(d, 0x5000 + 0x100 * n, len(payload), VIRTQ_DESC_F_NEXT, d + 1)
    drv.desc(d + 1, 0x8000 + 0x100 * n, 0x100, VIRTQ_DESC_F_WRITE)
    drv.offer(d)


def live_state(features: int = VIRTIO_F_VERSION_1) -> tuple[DeviceState, EchoDevice]:
    dev = EchoDevice()
    st = DeviceState(dev)
    mem = guest_ram()
    st.accept_features(1, features >> 32)
    st.accept_features(0, features & 0xFFFFFFFF)
    q = st.queues[0]
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    st.set_status(LIVE, mem, lambda: None)
    return st, dev


def test_queue_round_trip_continues_the_ring_indices():
    """A queue restored mid-use pops the next request, not the first again."""
    mem, q = guest_ram(), ready_queue()
    drv = Driver(mem)
    for n in range(3):
        echo(drv, n, f"req{n}".encode())
    for _ in range(2):
        chain = q.pop(mem)
        q.add_used(mem, chain.head, chain.write_all(mem, chain.read_all(mem)))
    saved = json.loads(json.dumps(q.save()))          # it must survive JSON as it is
    fresh = Virtqueue(SIZE)
    fresh.restore(saved, mem)
    assert (fresh.last_avail, fresh.used_idx, fresh.ready) == (2, 2, True)
    chain = fresh.pop(mem)
    assert chain is not None and chain.read_all(mem) == b"req2"
    fresh.add_used(mem, chain.head, 4)
    assert struct.unpack("<H", mem.read(USED + 2, 2))[0] == 3
    assert struct.unpack("<I", mem.read(USED + 4 + 8 * 2, 4))[0] == chain.head


@pytest.mark.parametrize("change, message", [
    ({"size": 3}, "power of two"),
    ({"size": 2 * SIZE}, "size 16 is not a power of two <= 8"),
    ({"used_addr": 0xFFFF0}, "used ring .* outside guest memory"),
    ({"desc_addr": 0x1008}, "aligned"),
    ({"last_avail": 0x10000}, "last_avail must be an integer in 0..65535"),
    ({"ready": 1}, "ready must be bool"),
    ({"max_size": 2 * SIZE}, "at most 16 entries"),
    ({"extra": 0}, "unknown extra"),
])
def test_a_corrupt_queue_state_is_refused_and_changes_nothing(change, message):
    mem, q = guest_ram(), ready_queue()
    saved = {**q.save(), **change}
    target = Virtqueue(SIZE)
    before = target.save()
    with pytest.raises(StateError, match=message):
        target.restore(saved, mem)
    assert target.save() == before


def test_a_queue_state_missing_a_field_names_it():
    saved = ready_queue().save()
    del saved["used_idx"]
    with pytest.raises(StateError, match="missing used_idx"):
        Virtqueue(SIZE).restore(saved, guest_ram())
    with pytest.raises(StateError, match="expected an object"):
        Virtqueue(SIZE).restore([1, 2], guest_ram())


def test_an_unready_queue_is_not_held_to_its_addresses():
    """The driver may have written part of a layout before the snapshot: that is no error."""
    q = Virtqueue(SIZE)
    q.desc_addr = 0xFFFFFFFF0
    fresh = Virtqueue(SIZE)
    fresh.restore(q.save(), guest_ram())
    assert fresh.desc_addr == 0xFFFFFFFF0 and not fresh.ready


def test_device_state_restore_activates_with_the_saved_features_and_queues():
    st, dev = live_state(VIRTIO_F_VERSION_1 | (1 << 5))
    mem = dev.activated[1]
    drv = Driver(mem)
    echo(drv, 0, b"one")
    dev.notify(0)
    st.config_changed()
    saved = json.loads(json.dumps(st.save()))
    dev2 = EchoDevice()
    st2 = DeviceState(dev2)
    interrupts = []
    st2.restore(saved, mem, lambda: interrupts.append(1))
    assert (st2.status, st2.driver_features, st2.config_generation) == \
        (st.status, st.driver_features, 1)
    features, _mem, queues, _irq = dev2.activated
    assert features == st.driver_features and queues[0] is st2.queues[0]
    drv.avail_idx = 1
    echo(drv, 1, b"two")
    dev2.notify(0)
    assert interrupts == [1] and drv.mem.read(0x8100, 3) == b"two"
    assert struct.unpack("<H", mem.read(USED + 2, 2))[0] == 2


def test_device_state_waiting_for_reset_is_restored_unactivated():
    st, dev = live_state(VIRTIO_F_VERSION_1 | (1 << 5))
    st.needs_reset()
    dev2 = EchoDevice()
    st2 = DeviceState(dev2)
    st2.restore(st.save(), guest_ram(), lambda: None)
    assert st2.status & STATUS_NEEDS_RESET and dev2.activated is None and not st2.live


@pytest.mark.parametrize("change, message", [
    ({"driver_features": VIRTIO_F_VERSION_1 | (1 << 7)}, "does not offer"),
    ({"driver_features": 1 << 5}, "FEATURES_OK without VIRTIO_F_VERSION_1"),
    ({"queues": []}, "0 queues saved, the device has 1"),
    ({"status": 256}, "status must be an integer"),
    ({"config_generation": "1"}, "config_generation must be an integer"),
])
def test_a_corrupt_device_state_is_refused_and_changes_nothing(change, message):
    st, _dev = live_state(VIRTIO_F_VERSION_1 | (1 << 5))
    dev2 = EchoDevice()
    st2 = DeviceState(dev2)
    with pytest.raises(StateError, match=message):
        st2.restore({**st.save(), **change}, guest_ram(), lambda: None)
    assert st2.status == 0 and dev2.activated is None and not st2.queues[0].ready


def test_a_bad_queue_in_a_device_state_is_named():
    st, _dev = live_state(VIRTIO_F_VERSION_1 | (1 << 5))
    saved = st.save()
    saved["queues"][0]["size"] = 3
    with pytest.raises(StateError, match="queue 0: virtqueue: size 3"):
        DeviceState(EchoDevice()).restore(saved, guest_ram(), lambda: None)


def test_the_optional_protocols_are_recognised_and_older_devices_need_neither():
    class Stateful(EchoDevice):
        def save_state(self) -> bytes:
            return b""

        def restore_state(self, data: bytes) -> None:
            pass

    class Quiescing(EchoDevice):
        def quiesce(self) -> int:
            return 0

        def resume(self) -> None:
            pass

    assert isinstance(Stateful(), StatefulDevice) and not isinstance(Stateful(), QuiescingDevice)
    assert isinstance(Quiescing(), QuiescingDevice)
    assert not isinstance(EchoDevice(), StatefulDevice | QuiescingDevice)
