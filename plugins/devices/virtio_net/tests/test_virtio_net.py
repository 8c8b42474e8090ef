"""virtio-net driven as Linux's driver does, over a datagram socket standing in for the tap
(one datagram per frame, as a tap reads and writes them) and over a real tap: frames both
ways, mergeable RX buffers, a flooded TX queue, tiny RX buffers, hostile rings (fuzzed)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stellarium_virtio_net.device import (
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_MRG_RXBUF,
    RX,
    TX,
    VirtioNet,
)
from stellarium_virtio_net.tap import TUN_F_CSUM, TUN_F_TSO4, VNET_HDR

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile

MAC = bytes.fromhex("525400123456")


@dataclass
class FakeTap:
    """One end of a SOCK_DGRAM socketpair: frames in and out, one datagram each."""

    sock: socket.socket
    offloads: list[int] = field(default_factory=list)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def close(self) -> None:
        self.sock.close()


def rig_and_peer(features: int | None = None) -> tuple[Rig, socket.socket, FakeTap]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    peer.setblocking(False)
    tap = FakeTap(ours)
    dev = VirtioNet(tap, MAC)
    return Rig(dev, features), peer, tap


def frame(n: int, fill: int = 0xAB) -> bytes:
    """A 12-byte virtio-net header (no offload) and an ``n``-byte Ethernet frame."""
    return bytes(VNET_HDR) + bytes([fill]) * n


def test_config_space_has_the_mac_and_link_up():
    rig, _peer, _tap = rig_and_peer()
    assert rig.dev.read_config(0, 8) == MAC + b"\x01\x00"
    rig.close()


def test_offloads_follow_what_the_guest_accepted():
    rig, _peer, tap = rig_and_peer()
    assert tap.offloads[-1] & (TUN_F_CSUM | TUN_F_TSO4) == TUN_F_CSUM | TUN_F_TSO4
    rig.dev.reset()
    rig.activate(rig.dev.features & ~(F_GUEST_CSUM | F_GUEST_TSO4))
    assert tap.offloads[-1] & (TUN_F_CSUM | TUN_F_TSO4) == 0
    rig.close()


def test_transmit_gathers_a_chain_into_one_frame():
    rig, peer, _ = rig_and_peer()
    data = frame(100)
    ring = rig.rings[TX]
    head, _ = ring.add([(data[:5], False), (data[5:40], False), (data[40:], False)])
    rig.kick(TX)
    assert peer.recv(65536) == data
    assert ring.used() == [(head, 0)]
    m = rig.dev.metrics()
    assert m["tx_packets"] == 1 and m["tx_bytes"] == 100
    rig.close()


def test_a_frame_spreads_over_mergeable_buffers():
    rig, peer, _ = rig_and_peer()
    ring = rig.rings[RX]
    bufs = [ring.add([(1526, True)]) for _ in range(3)]
    rig.kick(RX)
    data = frame(3000, 0x11)
    peer.send(data)
    rig.turn(0.5)
    used = ring.used()
    assert [h for h, _ in used] == [bufs[0][0], bufs[1][0]]
    assert [n for _, n in used] == [1526, len(data) - 1526]
    first = ring.read(bufs[0][1][0], 1526)
    assert struct.unpack_from("<H", first, 10)[0] == 2           # num_buffers
    got = first + ring.read(bufs[1][1][0], len(data) - 1526)
    assert got[VNET_HDR:] == data[VNET_HDR:]
    assert rig.interrupts >= 1 and rig.dev.metrics()["rx_packets"] == 1
    rig.close()


def test_a_frame_waits_for_buffers_then_arrives():
    rig, peer, _ = rig_and_peer()
    ring = rig.rings[RX]
    peer.send(frame(200))
    rig.turn(0.5)                                # no buffers yet: the frame is held
    assert ring.used() == []
    ring.add([(100, True)])                      # too few bytes: still held
    rig.kick(RX)
    assert ring.used() == []
    ring.add([(2048, True)])
    rig.kick(RX)
    assert [n for _, n in ring.used()] == [100, VNET_HDR + 200 - 100]
    assert rig.dev.metrics()["rx_dropped"] == 0
    rig.close()


def test_tiny_rx_buffers_are_returned_empty_and_counted():
    rig, peer, _ = rig_and_peer()
    ring = rig.rings[RX]
    tiny, _ = ring.add([(4, True)])
    good, _ = ring.add([(2048, True)])
    rig.kick(RX)
    peer.send(frame(60))
    rig.turn(0.5)
    assert ring.used() == [(tiny, 0), (good, VNET_HDR + 60)]
    assert rig.dev.metrics()["rx_bad_buffers"] == 1
    rig.close()


def test_without_mergeable_buffers_a_frame_too_large_is_dropped():
    rig, peer, _ = rig_and_peer()
    rig.dev.reset()
    rig.activate(rig.dev.features & ~F_MRG_RXBUF)
    ring = rig.rings[RX]
    ring.add([(1000, True)])
    rig.kick(RX)
    peer.send(frame(1500))
    peer.send(frame(500))
    rig.turn(0.5)
    used = ring.used()
    assert [n for _, n in used] == [VNET_HDR + 500]      # the big one dropped, the next fits
    assert rig.dev.metrics()["rx_dropped"] == 1
    rig.close()


def test_a_flooded_tx_queue_is_served_in_rounds(monkeypatch):
    import stellarium_virtio_net.device as net

    monkeypatch.setattr(net, "TX_BUDGET", 16)
    rig, peer, _ = rig_and_peer()
    ring = rig.rings[TX]
    for i in range(ring.size):
        ring.add([(frame(60, i), False)])
    rig.kick(TX)
    assert rig.dev.metrics()["tx_packets"] == 16     # one round, then the others' turn
    got: list[bytes] = []

    def drained() -> bool:
        while True:
            try:
                got.append(peer.recv(65536))
            except BlockingIOError:
                return len(got) == ring.size
    rig.settle(drained)
    assert got == [frame(60, i) for i in range(ring.size)]
    m = rig.dev.metrics()
    assert m["tx_packets"] + m["tx_dropped"] == ring.size
    rig.close()


def test_bad_transmit_chains_are_counted_not_sent():
    rig, peer, _ = rig_and_peer()
    ring = rig.rings[TX]
    ring.add([(b"short", False)])                 # not even a header
    ring.add([(frame(20), False), (64, True)])    # a writable part is ignored
    rig.kick(TX)
    assert rig.dev.metrics()["tx_errors"] == 1
    assert peer.recv(65536) == frame(20)
    assert len(ring.used()) == 2
    rig.close()


def test_hostile_ring_asks_for_reset():
    rig, _peer, _ = rig_and_peer()
    write_hostile(rig.rings[TX], ([(("abs", 1 << 50), 100, 0, 0)], [0], 1, [b""]))
    rig.kick(TX)
    assert rig.link.resets and "outside guest memory" in rig.link.resets[0]
    rig.close()


#: Payloads that are often plausible frames (a zero header and some Ethernet bytes).
FRAMES = st.one_of(st.binary(min_size=VNET_HDR + 14, max_size=200).map(
    lambda b: bytes(VNET_HDR) + b[VNET_HDR:]), st.binary(max_size=64))


@pytest.fixture(scope="module")
def fuzz_net():
    rig, peer, _ = rig_and_peer()
    yield rig, peer
    rig.close()
    peer.close()


@fuzz_settings()
@given(queue=st.sampled_from([RX, TX]), program=fuzz_strategy(FRAMES),
       incoming=st.lists(st.binary(min_size=0, max_size=1600), max_size=3))
def test_fuzz_random_rings(fuzz_net, queue, program, incoming):
    rig, peer = fuzz_net
    rig.restart()
    write_hostile(rig.rings[queue], program)
    for data in incoming:
        peer.send(data)
    with time_limit(2.0):
        rig.kick(queue)
        while rig.turn():
            pass
        rig.kick(queue)
    while True:                                  # drop what the fake tap was sent
        try:
            peer.recv(65536)
        except BlockingIOError:
            break
    rig.ram.check_guards()


def test_a_restored_device_shows_the_guest_the_mac_it_knew():
    from stellarium_core.virtio import StateError

    rig, peer, _tap = rig_and_peer()
    saved = rig.dev.save_state()
    other, peer2, _ = rig_and_peer()
    other.dev.mac = bytes(6)
    other.dev.restore_state(saved)
    assert other.dev.read_config(0, 6) == MAC
    with pytest.raises(StateError, match="not 6 bytes of hex"):
        other.dev.restore_state(b'{"mac": "0102"}')
    for r, p in ((rig, peer), (other, peer2)):
        r.close()
        p.close()
