"""The virtio network device (virtio 1.x, section 5.1) over a tap, in Python or in vhost-net.

Queue 0 receives (host to guest), queue 1 transmits. Every frame carries the 12-byte
virtio-net header, which the tap understands as is (IFF_VNET_HDR), so checksum and
TSO offloads are the host kernel's work: the device only tells the tap what the guest
accepted (TUNSETOFFLOAD).

In Python (``vhost`` off) the I/O thread reads a frame from the tap and spreads it over
as many receive buffers as it needs (VIRTIO_NET_F_MRG_RXBUF, ``num_buffers`` in the
header), and writes each transmit chain to the tap with one ``writev`` straight from
guest memory. With no receive buffers the tap is not read (frames wait in its queue,
where the host kernel drops what overflows). A guest that floods the transmit queue is
served in rounds of :data:`TX_BUDGET` chains, so other devices get their turn. A frame
that cannot be delivered is dropped and counted in :meth:`VirtioNet.metrics`: a guest's
receive buffer too small for the header, a transmit chain that is not a frame, a frame
the tap refuses.

With vhost-net the kernel serves both rings from the first kick to the reset.

A snapshot keeps the MAC the guest read from config space (a restored device shows the
guest the same one); a frame read from the tap and not yet delivered is dropped, as a
network may. With vhost-net the rings' indices are the kernel's, so such a device is not
a :class:`~stellarium_core.virtio.QuiescingDevice` yet and the VMM refuses to snapshot it.
"""

from __future__ import annotations

import errno
import json
import os
import select
import struct
from collections.abc import Callable

from stellarium_core.errors import ConfigError
from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    DeviceLink,
    GuestMemory,
    QueueDevice,
    QueueEventfds,
    StateError,
    Virtqueue,
    VirtqueueError,
    load_state,
)
from stellarium_virtio_net.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VNET_HDR,
    Tap,
)
from stellarium_virtio_net.vhost import VhostNet

DEVICE_ID = 1
RX, TX = 0, 1
QUEUE_SIZE = 256
F_CSUM, F_GUEST_CSUM, F_MAC = 1 << 0, 1 << 1, 1 << 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN = 1 << 7, 1 << 8, 1 << 9
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN = 1 << 11, 1 << 12, 1 << 13
F_MRG_RXBUF, F_STATUS = 1 << 15, 1 << 16
STATUS_LINK_UP = 1
#: The largest frame either way: a 64 KiB GSO frame, its Ethernet header and ours.
MAX_FRAME = VNET_HDR + 65536 + 14
#: Transmit chains served per turn of the event loop.
TX_BUDGET = 256
#: Frames received per turn (the tap stays readable, so the loop comes back).
RX_BUDGET = 64
ETH_HLEN = 14

_NUM_BUFFERS = struct.Struct("<H")

OFFLOADS = ((F_GUEST_CSUM, TUN_F_CSUM), (F_GUEST_TSO4, TUN_F_TSO4),
            (F_GUEST_TSO6, TUN_F_TSO6), (F_GUEST_ECN, TUN_F_TSO_ECN))


class VirtioNet(QueueDevice):
    """A NIC with MAC ``mac`` on ``tap``; ``vhost`` moves the data path into the kernel."""

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: Tap, mac: bytes, vhost: VhostNet | None = None) -> None:
        super().__init__()
        self.tap, self.mac, self.vhost = tap, mac, vhost
        feats = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | F_MAC | F_STATUS
                 | F_MRG_RXBUF | F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
                 | F_GUEST_ECN | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN)
        if vhost is not None:       # the ring features are the kernel's to serve
            ring = VIRTIO_RING_F_EVENT_IDX | F_MRG_RXBUF
            feats &= ~ring | vhost.features
        self.features = feats
        self._frame = bytearray(MAX_FRAME)
        self._held = 0                   # length of a frame read but not yet delivered
        self._more = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._eventfds: list[QueueEventfds] = []
        self.counters = dict.fromkeys((
            "rx_packets", "rx_bytes", "rx_dropped", "rx_bad_buffers", "tx_packets",
            "tx_bytes", "tx_dropped", "tx_errors"), 0)

    # -- the VirtioDevice contract ------------------------------------------------------

    def config(self) -> bytes:
        return self.mac + struct.pack("<H", STATUS_LINK_UP)

    def attach(self, link: DeviceLink) -> None:
        super().attach(link)
        if self.vhost is not None:
            try:
                self._eventfds = [link.queue_eventfds(q) for q in (RX, TX)]
            except RuntimeError as exc:
                raise ConfigError(f"vhost=on: {exc}", key="vhost") from None
            return
        link.loop.add(self.tap.fd, self._tap_readable, 0)     # watched while active
        link.loop.add(self._more, self._tx_again, select.EPOLLIN)

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        with self.lock:
            super().activate(features, mem, queues, interrupt)
            self.tap.set_offload(sum(tun for virtio, tun in OFFLOADS if features & virtio))
            if self.vhost is not None:
                self.vhost.start(features, mem, queues, self._eventfds, self.tap.fd)
            elif self.link is not None:
                self._watch_tap(True)

    def reset(self) -> None:
        with self.lock:
            if self.vhost is not None and self.vhost.queues:
                self.vhost.stop()
            elif self.link is not None and self.mem is not None:
                self._watch_tap(False)
            super().reset()
            self._held = 0

    def save_state(self) -> bytes:
        return json.dumps({"mac": self.mac.hex()}).encode()

    def restore_state(self, data: bytes) -> None:
        """The guest's MAC (its driver read it from config space before the snapshot)."""
        mac = load_state(data, "virtio-net", {"mac": str})["mac"]
        try:
            raw = bytes.fromhex(mac)
        except ValueError:
            raw = b""
        if len(raw) != 6:
            raise StateError(f"virtio-net: mac {mac!r} is not 6 bytes of hex")
        self.mac = raw

    def notify(self, queue: int) -> None:
        with self.lock:
            if not self.active:
                return
            if queue == TX:
                self._tx()
            elif queue == RX and self._held:
                self._watch_tap(True)       # buffers arrived for the frame we hold
                self._rx()

    def _watch_tap(self, on: bool) -> None:
        assert self.link is not None
        self.link.loop.modify(self.tap.fd, select.EPOLLIN if on else 0)

    # -- receive ---------------------------------------------------------------------------

    def _tap_readable(self, _events: int) -> None:
        with self.lock:
            if self.active:
                self._rx()
            else:
                self._watch_tap(False)          # a readable tap must not spin the loop

    def give_up(self, reason: str) -> None:
        super().give_up(reason)
        if self.vhost is None and self.link is not None:
            self._watch_tap(False)

    def _rx(self) -> None:
        q = self.queues[RX]
        delivered = 0
        try:
            for _ in range(RX_BUDGET):
                if not self._held:
                    try:
                        self._held = os.readv(self.tap.fd, [self._frame])
                    except BlockingIOError:
                        break
                    if self._held < VNET_HDR + ETH_HLEN:
                        self._held = 0
                        continue
                if not self._deliver(q, self._held):
                    self._watch_tap(False)      # no room: wait for the driver's buffers
                    break
                self._held = 0
                delivered += 1
        except VirtqueueError as exc:
            self._held = 0
            self.give_up(str(exc))
            return
        if delivered:
            self.used(q)

    def _deliver(self, q: Virtqueue, n: int) -> bool:
        """Put the held frame of ``n`` bytes into the guest's receive buffers.

        False when the buffers at hand are too few (they stay in the ring); True when
        the frame was delivered or dropped (counted).
        """
        mem = self.mem
        assert mem is not None
        mergeable = bool(self.acked & F_MRG_RXBUF)
        start = q.last_avail
        taken, room = [], 0
        while room < n:
            chain = q.pop(mem)
            if chain is None:
                q.last_avail = start            # not enough yet: give them back unread
                return False
            w = chain.writer(mem)
            if w.remaining < VNET_HDR:          # the spec's minimum; nothing fits in it
                q.add_used(mem, chain.head, 0)
                self.counters["rx_bad_buffers"] += 1
                start = q.last_avail
                continue
            taken.append((chain.head, w))
            room += w.remaining
            if not mergeable:
                break
        if room < n:                            # one buffer, and the frame is larger
            q.last_avail = start
            self.counters["rx_dropped"] += 1
            return True
        _NUM_BUFFERS.pack_into(self._frame, 10, len(taken))
        frame, pos = memoryview(self._frame), 0
        for head, w in taken:
            take = min(w.remaining, n - pos)
            w.write(frame[pos:pos + take])
            pos += take
            q.add_used(mem, head, w.written)
        self.counters["rx_packets"] += 1
        self.counters["rx_bytes"] += n - VNET_HDR
        return True

    # -- transmit --------------------------------------------------------------------------

    def _tx_again(self, _events: int) -> None:
        try:
            os.eventfd_read(self._more)
        except BlockingIOError:
            return
        with self.lock:
            if self.active:
                self._tx()

    def _tx(self) -> None:
        mem, q = self.mem, self.queues[TX]
        assert mem is not None
        sent = 0
        try:
            while sent < TX_BUDGET:
                chain = q.pop(mem)
                if chain is None:
                    break
                self._send(chain.reader(mem).views())
                q.add_used(mem, chain.head, 0)
                sent += 1
            else:
                os.eventfd_write(self._more, 1)     # more waiting: after the others' turn
        except VirtqueueError as exc:
            self.give_up(str(exc))
            return
        if sent:
            self.used(q)

    def _send(self, views: list[memoryview]) -> None:
        size = sum(map(len, views))
        if not VNET_HDR + ETH_HLEN <= size <= MAX_FRAME:
            self.counters["tx_errors"] += 1
            return
        try:
            os.writev(self.tap.fd, views)
        except (BlockingIOError, OSError) as exc:
            # EAGAIN/ENOBUFS: the host is not keeping up; EINVAL/EIO: not a frame it takes
            busy = isinstance(exc, BlockingIOError) or exc.errno == errno.ENOBUFS
            key = "tx_dropped" if busy else "tx_errors"
            self.counters[key] += 1
            return
        self.counters["tx_packets"] += 1
        self.counters["tx_bytes"] += size - VNET_HDR

    # -- the rest ---------------------------------------------------------------------------

    def close(self) -> None:
        if self.vhost is not None:
            if self.vhost.queues:
                self.vhost.stop()
            self.vhost.close()
        else:
            self.unwatch(self.tap.fd)
            self.unwatch(self._more)
        os.close(self._more)
        self.tap.close()
