"""virtio-vsock driven as Linux's driver does, against real unix sockets on the host:
Firecracker's CONNECT/OK handshake host to guest, ``<uds_path>_<port>`` guest to host,
credit-based flow control, hostile packets and rings (fuzzed), bad uds paths."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stellarium_virtio_vsock.device import (
    BUF_ALLOC,
    HDR,
    HOST_CID,
    LOCAL_PORT_BASE,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    RX,
    TX,
    TYPE_STREAM,
    VirtioVsock,
    open_listener,
)

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile
from stellarium_core.errors import ConfigError
from stellarium_core.plugins import Registry

CID = 42


class Guest:
    """The guest's vsock driver: RX buffers of header + 4 KiB, packets out on TX."""

    def __init__(self, tmp_path: Path, buf_alloc: int = 1 << 20) -> None:
        self.uds = str(tmp_path / "v.sock")
        self.dev = VirtioVsock(CID, self.uds, open_listener(self.uds))
        self.rig = Rig(self.dev)
        self.buf_alloc, self.fwd_cnt = buf_alloc, 0
        self.rx = self.rig.rings[RX]
        self.bufs: dict[int, int] = {}
        self.refill(32)

    def refill(self, n: int) -> None:
        for _ in range(n):
            head, addrs = self.rx.add([(HDR.size, True), (4096, True)])
            self.bufs[head] = addrs
        self.rig.kick(RX)

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"",
             dst_cid: int = HOST_CID, flags: int = 0) -> None:
        hdr = HDR.pack(CID, dst_cid, src_port, dst_port, len(data), TYPE_STREAM, op, flags,
                       self.buf_alloc, self.fwd_cnt)
        self.rig.rings[TX].add([(hdr, False)] + ([(data, False)] if data else []))
        self.rig.kick(TX)

    def packets(self, timeout: float = 2.0, want: int = 1) -> list[tuple[tuple, bytes]]:
        """Packets the device put in RX buffers (turning the loop until ``want`` came)."""
        got: list[tuple[tuple, bytes]] = []

        def arrived() -> bool:
            for head, n in self.rx.used():
                addrs = self.bufs.pop(head)
                raw = self.rx.read(addrs[0], HDR.size) + self.rx.read(addrs[1], n - HDR.size) \
                    if n > HDR.size else self.rx.read(addrs[0], n)
                hdr = HDR.unpack(raw[:HDR.size])
                got.append((hdr, raw[HDR.size:]))
                self.fwd_cnt += len(raw) - HDR.size
            return len(got) >= want
        self.rig.settle(arrived, timeout)
        self.refill(len(got))
        return got


def op(packet: tuple[tuple, bytes]) -> int:
    return packet[0][6]


def guest_connection(g: Guest, port: int, guest_port: int = 9) -> socket.socket:
    """A host server on ``<uds>_<port>`` and the guest connected to it: the host's end."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{g.uds}_{port}")
    server.listen(1)
    g.send(OP_REQUEST, guest_port, port)
    (resp,) = g.packets()
    assert op(resp) == OP_RESPONSE and resp[0][2:4] == (port, guest_port)
    conn, _ = server.accept()
    conn.settimeout(2)
    server.close()
    return conn


def test_host_connects_to_a_guest_port(tmp_path):
    g = Guest(tmp_path)
    host = socket.socket(socket.AF_UNIX)
    host.connect(g.uds)
    host.sendall(b"CONNECT 1234\n")
    (req,) = g.packets()
    src_cid, dst_cid, src_port, dst_port = req[0][:4]
    assert (op(req), src_cid, dst_cid, dst_port) == (OP_REQUEST, HOST_CID, CID, 1234)
    assert src_port == LOCAL_PORT_BASE
    g.send(OP_RESPONSE, 1234, src_port)
    host.settimeout(2)
    assert host.recv(100) == f"OK {src_port}\n".encode()
    host.sendall(b"hello guest")
    (rw,) = g.packets()
    assert op(rw) == OP_RW and rw[1] == b"hello guest"
    g.send(OP_RW, 1234, src_port, b"hello host")
    g.rig.turn()
    assert host.recv(100) == b"hello host"
    g.send(OP_RST, 1234, src_port)
    assert host.recv(100) == b""                  # the guest reset: the host sees EOF
    assert g.dev.metrics()["connections"] == 0
    g.rig.close()


def test_guest_connects_to_uds_path_underscore_port(tmp_path):
    g = Guest(tmp_path)
    conn = guest_connection(g, 5000, 777)
    g.send(OP_RW, 777, 5000, b"ping")
    assert conn.recv(100) == b"ping"
    conn.sendall(b"pong")
    (rw,) = g.packets()
    assert rw[1] == b"pong"
    conn.close()                                  # the host hangs up: the guest is told
    (shut,) = g.packets()
    assert op(shut) == OP_SHUTDOWN
    g.send(OP_RST, 777, 5000)
    assert g.dev.metrics()["connections"] == 0
    g.rig.close()


def test_guest_connecting_to_nobody_gets_a_reset(tmp_path):
    g = Guest(tmp_path)
    g.send(OP_REQUEST, 1, 6000)
    (rst,) = g.packets()
    assert op(rst) == OP_RST and g.dev.metrics()["refused"] == 1
    g.send(OP_RW, 1, 6000, b"no connection")         # data for nothing: reset again
    assert op(g.packets()[0]) == OP_RST
    g.send(OP_REQUEST, 1, 6000, dst_cid=99)           # not the host's CID
    assert op(g.packets()[0]) == OP_RST
    g.rig.close()


def test_the_host_never_sends_past_the_guests_credit(tmp_path):
    g = Guest(tmp_path, buf_alloc=1000)
    conn = guest_connection(g, 5001)
    conn.sendall(b"x" * 5000)
    got = b"".join(p[1] for p in g.packets(want=1))
    g.rig.turn(0.2)
    got += b"".join(p[1] for p in g.packets(timeout=0.3, want=0))
    assert len(got) == 1000                          # exactly the credit, then it waits
    g.fwd_cnt = 1000
    g.send(OP_CREDIT_UPDATE, 9, 5001)                # the guest consumed it: 1000 more
    more = b"".join(p[1] for p in g.packets(want=1))
    assert len(more) == 1000
    g.rig.close()


def test_a_guest_sending_past_its_credit_is_reset(tmp_path):
    g = Guest(tmp_path)
    conn = guest_connection(g, 5002)                 # accepted, but never read
    chunk = b"y" * 4096
    for _ in range(BUF_ALLOC // 4096 * 4):
        g.send(OP_RW, 9, 5002, chunk)
        if g.dev.metrics()["credit_violations"]:
            break
    assert g.dev.metrics()["credit_violations"] == 1
    assert any(op(p) == OP_RST for p in g.packets())
    conn.close()
    g.rig.close()


def test_a_bad_connect_line_closes_the_host_connection(tmp_path):
    g = Guest(tmp_path)
    host = socket.socket(socket.AF_UNIX)
    host.connect(g.uds)
    host.settimeout(2)
    host.sendall(b"HELLO 1234\n")
    g.rig.settle(lambda: g.dev.metrics()["refused"] == 1)
    assert host.recv(10) == b""
    g.rig.close()


def test_uds_path_errors(tmp_path):
    reg = Registry()
    with pytest.raises(ConfigError, match="directory of .* does not exist"):
        reg.create("device", "virtio-vsock", {"guest_cid": 3,
                                              "uds_path": str(tmp_path / "no/v.sock")},
                   context=None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        open_listener(str(tmp_path / "file"))
    live = open_listener(str(tmp_path / "live.sock"))
    with pytest.raises(ConfigError, match="in use: another VMM listens"):
        open_listener(str(tmp_path / "live.sock"))
    live.close()
    stale = open_listener(str(tmp_path / "live.sock"))       # nobody listens: replaced
    stale.close()
    with pytest.raises(ConfigError, match="guest_cid"):
        reg.create("device", "virtio-vsock", {"guest_cid": "2", "uds_path": "x"},
                   context=None)
    dev = reg.create("device", "virtio-vsock", {"guest_cid": "3",
                                                "uds_path": str(tmp_path / "ok.sock")},
                     context=None)
    assert dev.host_paths() == [(str(tmp_path), True)]
    assert struct.unpack("<Q", dev.read_config(0, 8))[0] == 3
    dev.close()
    assert not (tmp_path / "ok.sock").exists()


#: Packets that are often well-formed: our CIDs, stream type, any op and ports.
PACKETS = st.one_of(
    st.tuples(st.sampled_from([CID, CID, 7]), st.sampled_from([HOST_CID, HOST_CID, 5]),
              st.integers(0, 5), st.integers(0, 5), st.integers(0, 200),
              st.sampled_from([TYPE_STREAM, TYPE_STREAM, 2]), st.integers(0, 8),
              st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 1 << 20)).map(
        lambda t: HDR.pack(*t)),
    st.binary(max_size=64))


@pytest.fixture(scope="module")
def fuzz_vsock(tmp_path_factory):
    d = tmp_path_factory.mktemp("vsock")
    for port in range(3):                          # some guest connections succeed
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / f"v.sock_{port}"))
        s.listen(1000)
    g = Guest(d)
    yield g
    g.rig.close()


@fuzz_settings()
@given(queue=st.sampled_from([RX, TX, TX]), program=fuzz_strategy(PACKETS))
def test_fuzz_random_rings(fuzz_vsock, queue, program):
    rig = fuzz_vsock.rig
    rig.restart()
    write_hostile(rig.rings[queue], program)
    with time_limit(2.0):
        rig.kick(queue)
        for _ in range(3):
            rig.turn()
        rig.kick(queue)
    rig.ram.check_guards()


def test_a_restored_device_tells_the_guest_its_connections_are_gone(tmp_path):
    """Snapshot restore: the transport reset event goes into the first event buffer that
    holds it, once a queue is kicked (the transport kicks every ready queue)."""
    from stellarium_virtio_vsock.device import EVENT, EVENT_TRANSPORT_RESET

    from stellarium_core.virtio import StateError, StatefulDevice

    g = Guest(tmp_path)
    assert isinstance(g.dev, StatefulDevice) and g.dev.save_state() == b""
    events = g.rig.rings[EVENT]
    g.dev.restore_state(b"")
    g.rig.kick(RX)
    assert events.used() == []                        # no event buffer posted yet
    events.add([(2, True)])                           # too small: returned empty
    head, (addr,) = events.add([(4, True)])
    g.rig.kick(EVENT)
    used = events.used()
    assert [n for _h, n in used] == [0, 4] and used[1][0] == head
    assert struct.unpack("<I", events.read(addr, 4))[0] == EVENT_TRANSPORT_RESET
    events.add([(4, True)])
    g.rig.kick(EVENT)
    assert events.used() == []                        # one event per restore
    with pytest.raises(StateError, match="expected no saved state"):
        g.dev.restore_state(b"{}")
    g.rig.close()
