"""The virtio contract: split virtqueues over a fake guest memory, hostile descriptors,
feature negotiation and device status handling."""

from __future__ import annotations

import struct

import pytest

from stellarium_core.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceState,
    GuestMemory,
    RegionMemory,
    VirtioDevice,
    Virtqueue,
    VirtqueueError,
)

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
SIZE = 8


def guest_ram() -> RegionMemory:
    """64 KiB of guest RAM at guest address 0, bounds-checked like a VMM's."""
    return RegionMemory.over(bytearray(0x10000))


class Driver:
    """The guest side: fills descriptors and the available ring."""

    def __init__(self, mem: RegionMemory) -> None:
        self.mem, self.avail_idx = mem, 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % SIZE), struct.pack("<H", head))
        self.avail_idx += 1
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx & 0xFFFF))


def ready_queue() -> Virtqueue:
    q = Virtqueue(SIZE)
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    return q


def test_chain_is_walked_read_and_written_and_returned_used():
    mem, drv, q = guest_ram(), None, ready_queue()
    drv = Driver(mem)
    mem.write(0x5000, b"request!")
    drv.desc(0, 0x5000, 8, VIRTQ_DESC_F_NEXT, 3)
    drv.desc(3, 0x6000, 16, VIRTQ_DESC_F_WRITE)
    drv.offer(0)
    q.check(mem)
    assert q.pending(mem) == 1
    chain = q.pop(mem)
    assert chain is not None and chain.head == 0
    assert chain.read_all(mem) == b"request!"
    assert chain.write_all(mem, b"response") == 8
    q.add_used(mem, chain.head, 8)
    assert mem.read(0x6000, 8) == b"response"
    assert struct.unpack("<HHII", mem.read(USED, 12)) == (0, 1, 0, 8)
    assert q.pop(mem) is None


@pytest.mark.parametrize("setup, message", [
    (lambda d: d.desc(0, 0xFFFF0, 0x100), "outside guest memory"),
    (lambda d: (d.desc(0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 1),
                d.desc(1, 0x5000, 4, VIRTQ_DESC_F_NEXT, 0)), "loops back"),
    (lambda d: d.desc(0, 0x5000, 4, VIRTQ_DESC_F_NEXT, SIZE + 5), "outside the queue"),
    (lambda d: (d.desc(0, 0x5000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
                d.desc(1, 0x5000, 4)), "readable buffer after a writable"),
    (lambda d: d.desc(0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT), "indirect"),
])
def test_hostile_descriptors_are_rejected(setup, message):
    mem, q = guest_ram(), ready_queue()
    drv = Driver(mem)
    setup(drv)
    drv.offer(0)
    with pytest.raises(VirtqueueError, match=message):
        q.pop(mem)


def test_over_long_chain_is_rejected():
    mem, q = guest_ram(), ready_queue()
    drv = Driver(mem)
    # A chain through every descriptor that then points back at one: longer than the queue.
    for i in range(SIZE):
        drv.desc(i, 0x5000, 1, VIRTQ_DESC_F_NEXT, (i + 1) % SIZE)
    drv.offer(0)
    with pytest.raises(VirtqueueError):
        q.pop(mem)


def test_avail_index_jumping_past_queue_size_is_rejected():
    mem, q = guest_ram(), ready_queue()
    mem.write(AVAIL + 2, struct.pack("<H", SIZE + 1))
    with pytest.raises(VirtqueueError, match="more than the queue size"):
        q.pop(mem)


def test_ring_outside_memory_or_misaligned_fails_check():
    mem = guest_ram()
    q = ready_queue()
    q.used_addr = 0xFFFF0
    with pytest.raises(VirtqueueError, match="used ring"):
        q.check(mem)
    q = ready_queue()
    q.desc_addr = 0x1008
    with pytest.raises(VirtqueueError, match="aligned"):
        q.check(mem)
    with pytest.raises(ValueError):
        Virtqueue(3)


def test_index_wraps_at_16_bits():
    mem, q = guest_ram(), ready_queue()
    drv = Driver(mem)
    drv.avail_idx = q.last_avail = 0xFFFF
    drv.desc(2, 0x5000, 4)
    drv.offer(2)
    chain = q.pop(mem)
    assert chain is not None and chain.head == 2 and q.last_avail == 0


class EchoDevice:
    """A minimal device: echoes each readable buffer into the writable ones."""

    device_id = 0x7F
    features = VIRTIO_F_VERSION_1 | (1 << 5)
    queue_sizes = (SIZE,)

    def __init__(self) -> None:
        self.activated = None
        self.resets = 0

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features, mem, queues, interrupt) -> None:
        self.activated = (features, mem, queues, interrupt)

    def notify(self, queue: int) -> None:
        _features, mem, queues, interrupt = self.activated
        for chain in queues[queue].drain(mem):
            queues[queue].add_used(mem, chain.head, chain.write_all(mem, chain.read_all(mem)))
        interrupt()

    def reset(self) -> None:
        self.resets += 1


def test_feature_negotiation_and_activation():
    dev = EchoDevice()
    assert isinstance(dev, VirtioDevice) and isinstance(guest_ram(), GuestMemory)
    st = DeviceState(dev)
    mem = guest_ram()
    st.accept_features(0, 0xFFFFFFFF)        # asks for more than offered: dropped
    st.accept_features(1, 1)                 # VERSION_1
    assert st.driver_features == VIRTIO_F_VERSION_1 | (1 << 5)
    st.queues[0].desc_addr, st.queues[0].avail_addr, st.queues[0].used_addr = DESC, AVAIL, USED
    st.queues[0].ready = True
    kicks = []
    st.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, mem, lambda: None)
    assert st.status & STATUS_FEATURES_OK
    st.set_status(st.status | STATUS_DRIVER_OK, mem, lambda: kicks.append(1))
    assert dev.activated is not None
    drv = Driver(mem)
    mem.write(0x5000, b"ping")
    drv.desc(0, 0x5000, 4, VIRTQ_DESC_F_NEXT, 1)
    drv.desc(1, 0x6000, 4, VIRTQ_DESC_F_WRITE)
    drv.offer(0)
    dev.notify(0)
    assert mem.read(0x6000, 4) == b"ping" and kicks == [1]
    st.set_status(0, mem, lambda: None)
    assert st.status == 0 and dev.resets == 1 and not st.queues[0].ready


def test_legacy_driver_without_version_1_cannot_set_features_ok():
    st = DeviceState(EchoDevice())
    st.accept_features(0, 1 << 5)
    st.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, guest_ram(),
                  lambda: None)
    assert not st.status & STATUS_FEATURES_OK


def test_bad_ring_at_driver_ok_sets_needs_reset():
    dev = EchoDevice()
    st = DeviceState(dev)
    st.accept_features(1, 1)
    st.queues[0].desc_addr, st.queues[0].ready = 0xFFFFF000, True
    st.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
                  guest_ram(), lambda: None)
    assert st.status & STATUS_NEEDS_RESET and dev.activated is None


def _need_event(event: int, new: int, old: int) -> bool:
    """The driver's side of the event-index handshake (vring_need_event)."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def test_event_idx_publishes_avail_event_and_honours_used_event():
    mem, q = guest_ram(), ready_queue()
    q.event_idx = True
    drv = Driver(mem)
    avail_event, used_event = USED + 4 + 8 * SIZE, AVAIL + 4 + 2 * SIZE
    for i in range(3):
        drv.desc(i, 0x5000 + 16 * i, 4)
    kicks = 0
    for head in range(3):                       # the driver offers one at a time
        old = drv.avail_idx
        drv.offer(head)
        event = struct.unpack("<H", mem.read(avail_event, 2))[0]
        if _need_event(event, drv.avail_idx, old):
            kicks += 1
            while (chain := q.pop(mem)) is not None:    # the device drains until empty
                q.add_used(mem, chain.head, 0)
    assert kicks == 3 and q.last_avail == 3
    assert struct.unpack("<H", mem.read(avail_event, 2))[0] == 3
    # Two offers while the device is busy: only the first crosses avail_event.
    drv.desc(3, 0x6000, 4)
    drv.desc(4, 0x6010, 4)
    needs = []
    for head in (3, 4):
        old = drv.avail_idx
        drv.offer(head)
        needs.append(_need_event(struct.unpack("<H", mem.read(avail_event, 2))[0],
                                 drv.avail_idx, old))
    assert needs == [True, False]
    # used_event: the driver wants an interrupt only once used idx passes 4.
    mem.write(used_event, struct.pack("<H", 4))
    q.wants_interrupt(mem)                      # consumes the 3 used so far
    q.add_used(mem, q.pop(mem).head, 0)          # used idx 4: event 4 not passed
    assert not q.wants_interrupt(mem)
    q.add_used(mem, q.pop(mem).head, 0)          # used idx 5: passes 4
    assert q.wants_interrupt(mem)
    assert q.pop(mem) is None and not q.wants_interrupt(mem)


def test_without_event_idx_no_interrupt_flag_is_honoured_and_avail_event_untouched():
    mem, q = guest_ram(), ready_queue()
    mem.write(USED + 4 + 8 * SIZE, struct.pack("<H", 0x4242))
    assert q.pop(mem) is None
    assert mem.read(USED + 4 + 8 * SIZE, 2) == struct.pack("<H", 0x4242)
    assert q.wants_interrupt(mem)
    mem.write(AVAIL, struct.pack("<H", 1))      # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert not q.wants_interrupt(mem)


def test_needs_reset_survives_status_writes_and_event_idx_follows_negotiation():
    dev = EchoDevice()
    dev.features |= VIRTIO_RING_F_EVENT_IDX
    st = DeviceState(dev)
    st.accept_features(0, VIRTIO_RING_F_EVENT_IDX)
    st.accept_features(1, 1)
    q = st.queues[0]
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    st.set_status(ok, guest_ram(), lambda: None)
    assert st.live and q.event_idx
    st.needs_reset()
    assert not st.live
    st.set_status(ok, guest_ram(), lambda: None)
    assert st.status & STATUS_NEEDS_RESET and not st.live
    st.set_status(0, guest_ram(), lambda: None)
    assert st.status == 0 and not q.event_idx
