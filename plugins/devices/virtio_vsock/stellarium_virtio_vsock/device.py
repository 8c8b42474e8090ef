"""The virtio socket device (virtio 1.x, section 5.10) with Firecracker's host side.

The host speaks plain unix stream sockets:

- host to guest: a host program connects to ``uds_path`` and writes ``CONNECT <port>\\n``;
  the device asks the guest (REQUEST to that port) and, once the guest accepts, answers
  ``OK <host port>\\n``; from then on the socket carries the stream;
- guest to host: a guest connecting to CID 2 port P makes the device connect to
  ``<uds_path>_P``; a refused or missing socket is a reset (RST) for the guest.

Flow control is the spec's credit scheme: every packet tells the peer how much buffer
(``buf_alloc``) and how many bytes consumed (``fwd_cnt``) its side has. The device never
sends the guest more than the guest's free credit, and keeps at most ``BUF_ALLOC`` bytes
of guest data a slow host socket has not taken yet, which is exactly the credit it
granted: a guest that sends past it gets its connection reset. Data from a host socket
is received straight into the guest's RX buffer (one copy), without a Python buffer.

Everything runs in the VMM's I/O thread: kicks, the listening socket, each connection's
socket. A host socket is read only while the guest has credit and RX buffers for it.

Connections do not survive a snapshot: their host ends belong to the process that took
it. A restored device starts with none and tells the guest so with a transport reset
event (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) in the event queue, as Firecracker does: the
guest's driver resets every connected socket and re-reads its CID; its listening
sockets stay, and new connections work at once.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ChainTooShort,
    DeviceLink,
    GuestMemory,
    QueueDevice,
    StateError,
    Virtqueue,
    VirtqueueError,
)

DEVICE_ID = 19
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = \
    range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
HDR = struct.Struct("<QQIIIHHIII")   # src/dst cid, src/dst port, len, type, op, flags,
                                      # buf_alloc, fwd_cnt (44 bytes)
#: Bytes of guest data the device buffers per connection: the credit it grants.
BUF_ALLOC = 256 << 10
#: Payload of one packet either way.
MAX_PAYLOAD = 64 << 10
MAX_CONNECTIONS = 1024
#: Host connections still writing their CONNECT line.
MAX_PENDING = 64
CONNECT_LINE_MAX = 32
#: Host-side ports for host-initiated connections start here (as Firecracker's do).
LOCAL_PORT_BASE = 1 << 30
#: struct virtio_vsock_event (le32 id) and its one id.
EVENT_ID = struct.Struct("<I")
EVENT_TRANSPORT_RESET = 0


@dataclass
class Connection:
    """One stream between a host unix socket and a guest port."""

    sock: socket.socket
    local_port: int                 # the host side's vsock port
    peer_port: int                  # the guest's
    established: bool
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0                 # bytes sent to the guest
    fwd_cnt: int = 0                # guest bytes handed to the host socket
    fwd_reported: int = 0
    out: bytearray | None = None    # guest bytes the host socket has not taken yet
    shut_rcv: bool = False          # the guest will not receive more
    host_eof: bool = False
    events: int = 0                 # what the event loop watches on ``sock``
    registered: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def peer_credit(self) -> int:
        return self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)


class VirtioVsock(QueueDevice):
    """A vsock device for guest ``guest_cid`` whose host side listens on ``uds_path``."""

    device_id = DEVICE_ID
    features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: str, listener: socket.socket) -> None:
        super().__init__()
        self.guest_cid, self.uds_path, self.listener = guest_cid, uds_path, listener
        self.conns: dict[tuple[int, int], Connection] = {}
        self.pending: dict[int, tuple[socket.socket, bytearray]] = {}
        self.control: collections.deque[bytes] = collections.deque()
        self._rx_waiting: set[tuple[int, int]] = set()    # readable, but no RX buffer
        self._next_port = LOCAL_PORT_BASE
        self._reset_event = False             # a transport reset waits for an event buffer
        self.counters = dict.fromkeys((
            "host_connections", "guest_connections", "refused", "resets", "rx_bytes",
            "tx_bytes", "bad_packets", "credit_violations"), 0)

    # -- lifecycle -----------------------------------------------------------------------

    def config(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    def attach(self, link: DeviceLink) -> None:
        super().attach(link)
        link.loop.add(self.listener.fileno(), self._accept, select.EPOLLIN)

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        with self.lock:
            super().activate(features, mem, queues, interrupt)

    def reset(self) -> None:
        """The guest's sockets are gone: so are the host ends of every connection."""
        with self.lock:
            for c in list(self.conns.values()):
                self._drop(c)
            self.control.clear()
            self._reset_event = False
            super().reset()

    def host_paths(self) -> list[tuple[str, bool]]:
        """The socket directory: guest-to-host connections go to ``<uds_path>_PORT`` there,
        and the listening socket is removed from it at the end."""
        return [(os.path.dirname(os.path.abspath(self.uds_path)), True)]

    def close(self) -> None:
        with self.lock:
            for c in list(self.conns.values()):
                self._drop(c)
            for fd, (s, _) in list(self.pending.items()):
                self.unwatch(fd)
                s.close()
            self.pending.clear()
            self.unwatch(self.listener.fileno())
            self.listener.close()
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass

    def metrics(self) -> dict[str, int]:
        return {**self.counters, "connections": len(self.conns)}

    # -- snapshots ---------------------------------------------------------------------------

    def save_state(self) -> bytes:
        """Nothing carries over (connections cannot); restoring sends the transport reset."""
        return b""

    def restore_state(self, data: bytes) -> None:
        """Queue the transport reset event; it goes out with the next kick of any queue
        (the transport kicks every ready queue after a restore)."""
        if data:
            raise StateError(f"virtio-vsock: expected no saved state, got {len(data)} bytes")
        with self.lock:
            self._reset_event = self.active

    def _send_reset_event(self) -> None:
        """Into the first event buffer the event fits (the driver posts them at probe)."""
        mem, q = self.mem, self.queues[EVENT]
        assert mem is not None
        used = 0
        while self._reset_event and (chain := q.pop(mem)) is not None:
            w = chain.writer(mem)
            if w.remaining >= EVENT_ID.size:
                w.pack(EVENT_ID, EVENT_TRANSPORT_RESET)
                self._reset_event = False
            else:
                self.counters["bad_packets"] += 1
            q.add_used(mem, chain.head, w.written)
            used += 1
        if used:
            self.used(q)

    # -- kicks -------------------------------------------------------------------------------

    def notify(self, queue: int) -> None:
        with self.lock:
            if not self.active:
                return
            try:
                if self._reset_event:
                    self._send_reset_event()
                if queue == TX:
                    self._tx()
                elif queue == RX:
                    for key in list(self._rx_waiting):    # buffers arrived: read again
                        c = self.conns.get(key)
                        if c is not None:
                            self._watch(c)
                    self._rx_waiting.clear()
                self._flush()
            except VirtqueueError as exc:
                self.give_up(str(exc))

    # -- guest to device ---------------------------------------------------------------------

    def _tx(self) -> None:
        mem, q = self.mem, self.queues[TX]
        assert mem is not None
        used = 0
        for chain in q.drain(mem):
            r = chain.reader(mem)
            try:
                hdr = r.unpack(HDR)
                payload = r.views(min(hdr[4], MAX_PAYLOAD, r.remaining)) if hdr[6] == OP_RW \
                    else []
            except ChainTooShort:
                self.counters["bad_packets"] += 1
            else:
                self._packet(hdr, payload)
            q.add_used(mem, chain.head, 0)
            used += 1
        if used:
            self.used(q)

    def _packet(self, hdr: tuple, payload: list[memoryview]) -> None:
        src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd_cnt = hdr
        if src_cid != self.guest_cid or dst_cid != HOST_CID or typ != TYPE_STREAM:
            self.counters["bad_packets"] += 1
            if op != OP_RST:
                self._reply(dst_port, src_port, OP_RST)
            return
        c = self.conns.get((dst_port, src_port))
        if c is not None:
            c.peer_buf_alloc, c.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            self._guest_connects(dst_port, src_port, buf_alloc, fwd_cnt, exists=c is not None)
        elif c is None:
            if op != OP_RST:
                self._reply(dst_port, src_port, OP_RST)
        elif op == OP_RESPONSE and not c.established:
            c.established = True
            try:
                c.sock.send(f"OK {c.local_port}\n".encode())
            except OSError:
                self._reset(c)
                return
            self._watch(c)
        elif op == OP_RW and c.established:
            self._from_guest(c, payload)
        elif op == OP_CREDIT_UPDATE:
            self._watch(c)
        elif op == OP_CREDIT_REQUEST:
            self._credit_update(c)
        elif op == OP_SHUTDOWN:
            self._guest_shutdown(c, flags)
        elif op == OP_RST:
            self._drop(c)
        else:
            self.counters["bad_packets"] += 1
            self._reset(c)

    def _guest_connects(self, port: int, peer_port: int, buf_alloc: int, fwd_cnt: int,
                        *, exists: bool) -> None:
        if exists or len(self.conns) >= MAX_CONNECTIONS:
            self._reply(port, peer_port, OP_RST)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError:
            sock.close()
            self.counters["refused"] += 1
            self._reply(port, peer_port, OP_RST)
            return
        c = Connection(sock, port, peer_port, True, buf_alloc, fwd_cnt)
        self.conns[c.key] = c
        self.counters["guest_connections"] += 1
        self._reply(port, peer_port, OP_RESPONSE)
        self._watch(c)

    def _from_guest(self, c: Connection, payload: list[memoryview]) -> None:
        n = sum(map(len, payload))
        backlog = len(c.out) if c.out else 0
        if backlog + n > BUF_ALLOC:                  # past the credit we granted
            self.counters["credit_violations"] += 1
            self._reset(c)
            return
        self.counters["tx_bytes"] += n
        if backlog:
            c.out.extend(b"".join(payload))          # type: ignore[union-attr]
        else:
            self._send_host(c, payload)
        self._watch(c)

    def _send_host(self, c: Connection, views: list[memoryview]) -> None:
        """Write to the host socket what it takes now; keep the rest for EPOLLOUT."""
        try:
            sent = c.sock.sendmsg(views) if views else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self._reset(c)
            return
        total = sum(map(len, views))
        if sent < total:
            rest = b"".join(views)[sent:]
            c.out = bytearray(rest) if c.out is None else c.out + rest
        self._consumed(c, sent)

    def _consumed(self, c: Connection, n: int) -> None:
        """``n`` more guest bytes reached the host: tell the guest once it matters."""
        c.fwd_cnt = (c.fwd_cnt + n) & 0xFFFFFFFF
        if (c.fwd_cnt - c.fwd_reported) & 0xFFFFFFFF >= BUF_ALLOC // 4:
            self._credit_update(c)

    def _guest_shutdown(self, c: Connection, flags: int) -> None:
        if flags & SHUTDOWN_RCV:
            c.shut_rcv = True
        if flags & SHUTDOWN_SEND and not c.out:
            try:
                c.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND:
            self._reset(c)                       # both ways closed: done, tell the guest
        else:
            self._watch(c)

    # -- device to guest ----------------------------------------------------------------------

    def _reply(self, local_port: int, peer_port: int, op: int, flags: int = 0,
               c: Connection | None = None) -> None:
        fwd = c.fwd_cnt if c is not None else 0
        if c is not None:
            c.fwd_reported = fwd
        self.control.append(HDR.pack(HOST_CID, self.guest_cid, local_port, peer_port, 0,
                                     TYPE_STREAM, op, flags, BUF_ALLOC, fwd))

    def _credit_update(self, c: Connection) -> None:
        self._reply(c.local_port, c.peer_port, OP_CREDIT_UPDATE, c=c)

    def _flush(self) -> None:
        """Put queued control packets into the guest's RX buffers."""
        if not self.control or not self.active:
            return
        mem, q = self.mem, self.queues[RX]
        assert mem is not None
        used = 0
        while self.control:
            chain = q.pop(mem)
            if chain is None:
                break
            w = chain.writer(mem)
            pkt = self.control.popleft()
            if w.remaining < HDR.size:
                self.counters["bad_packets"] += 1   # a buffer no packet fits in
                q.add_used(mem, chain.head, 0)
                self.control.appendleft(pkt)
            else:
                w.write(pkt)
                q.add_used(mem, chain.head, HDR.size)
            used += 1
        if used:
            self.used(q)

    def _to_guest(self, c: Connection) -> None:
        """Receive from ``c``'s host socket straight into one RX buffer of the guest."""
        mem, q = self.mem, self.queues[RX]
        assert mem is not None
        credit = c.peer_credit()
        if c.host_eof:
            return
        if credit <= 0 or c.shut_rcv:
            self._watch(c)                      # stop reading until the guest frees credit
            return
        chain = q.pop(mem)
        if chain is None:
            self._rx_waiting.add(c.key)
            self._watch(c)
            return
        w = chain.writer(mem)
        if w.remaining <= HDR.size:
            self.counters["bad_packets"] += 1
            q.add_used(mem, chain.head, 0)
            self.used(q)
            return
        head = w.views(HDR.size)
        room = w.views(min(w.remaining, credit, MAX_PAYLOAD))
        try:
            n, _, _, _ = c.sock.recvmsg_into(room)
        except BlockingIOError:
            q.last_avail = (q.last_avail - 1) & 0xFFFF      # nothing after all: unpop
            return
        except OSError:
            n = 0
        op, flags = OP_RW, 0
        if n == 0:                              # the host closed its end: HUP stays set,
            c.host_eof = True                   # so stop watching until the guest's RST
            op, flags = OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND
            self.unwatch(c.sock.fileno())
            c.registered, c.events = False, 0
        c.tx_cnt = (c.tx_cnt + n) & 0xFFFFFFFF
        c.fwd_reported = c.fwd_cnt
        hdr = HDR.pack(HOST_CID, self.guest_cid, c.local_port, c.peer_port, n, TYPE_STREAM,
                       op, flags, BUF_ALLOC, c.fwd_cnt)
        _scatter(head, hdr)
        q.add_used(mem, chain.head, HDR.size + n)
        self.counters["rx_bytes"] += n
        self.used(q)
        self._watch(c)

    # -- host sockets ------------------------------------------------------------------------

    def _accept(self, _events: int) -> None:
        with self.lock:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if len(self.pending) >= MAX_PENDING or not self.active:
                sock.close()
                return
            sock.setblocking(False)
            fd = sock.fileno()
            self.pending[fd] = (sock, bytearray())
            assert self.link is not None
            self.link.loop.add(fd, lambda ev, fd=fd: self._connect_line(fd), select.EPOLLIN)

    def _connect_line(self, fd: int) -> None:
        """A host program's ``CONNECT <port>\\n``: ask the guest to accept it."""
        with self.lock:
            sock, buf = self.pending[fd]
            try:
                data = sock.recv(CONNECT_LINE_MAX - len(buf))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            buf += data
            if b"\n" not in buf and data and len(buf) < CONNECT_LINE_MAX:
                return
            self.unwatch(fd)
            del self.pending[fd]
            port = _parse_connect(bytes(buf))
            if port is None or not self.active or len(self.conns) >= MAX_CONNECTIONS:
                sock.close()
                self.counters["refused"] += 1
                return
            local = self._allocate_port(port)
            c = Connection(sock, local, port, False)
            self.conns[c.key] = c
            self.counters["host_connections"] += 1
            self._reply(local, port, OP_REQUEST, c=c)
            self._watch(c)
            try:
                self._flush()
            except VirtqueueError as exc:
                self.give_up(str(exc))

    def _allocate_port(self, peer_port: int) -> int:
        while (self._next_port, peer_port) in self.conns:
            self._next_port += 1
        port = self._next_port
        self._next_port = LOCAL_PORT_BASE + ((self._next_port + 1 - LOCAL_PORT_BASE)
                                             % (1 << 30))
        return port

    def _host_ready(self, key: tuple[int, int], events: int) -> None:
        with self.lock:
            c = self.conns.get(key)
            if c is None or not self.active:
                return
            try:
                if events & select.EPOLLOUT and c.out:
                    self._drain_out(c)
                if c.key in self.conns and events & (select.EPOLLIN | select.EPOLLHUP) \
                        and c.established:
                    self._to_guest(c)
                self._flush()
            except VirtqueueError as exc:
                self.give_up(str(exc))

    def _drain_out(self, c: Connection) -> None:
        assert c.out is not None
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._reset(c)
            return
        del c.out[:sent]
        self._consumed(c, sent)
        self._watch(c)

    def _watch(self, c: Connection) -> None:
        """Watch ``c``'s socket for what we can act on now."""
        if c.key not in self.conns or self.link is None or c.host_eof:
            return
        ev = 0
        if c.out:
            ev |= select.EPOLLOUT
        if c.established and not c.host_eof and not c.shut_rcv and c.peer_credit() > 0 \
                and c.key not in self._rx_waiting:
            ev |= select.EPOLLIN
        fd = c.sock.fileno()
        if not c.registered:
            self.link.loop.add(fd, lambda e, k=c.key: self._host_ready(k, e), ev)
            c.registered = True
        elif c.events != ev:
            self.link.loop.modify(fd, ev)
        c.events = ev

    def _reset(self, c: Connection) -> None:
        """End ``c`` and tell the guest (RST)."""
        self.counters["resets"] += 1
        self._reply(c.local_port, c.peer_port, OP_RST)
        self._drop(c)

    def _drop(self, c: Connection) -> None:
        self.conns.pop(c.key, None)
        self._rx_waiting.discard(c.key)
        if c.registered:
            self.unwatch(c.sock.fileno())
        c.sock.close()


def _parse_connect(line: bytes) -> int | None:
    text, nl, _ = line.partition(b"\n")
    parts = text.split(b" ")
    if not nl or len(parts) != 2 or parts[0] != b"CONNECT" or not parts[1].isdigit():
        return None
    port = int(parts[1])
    return port if port < 1 << 32 else None


def _scatter(views: list[memoryview], data: bytes) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos:pos + len(v)]
        pos += len(v)


def open_listener(uds_path: str) -> socket.socket:
    """Listen on ``uds_path``; a stale socket file is replaced, anything else refused."""
    from stellarium_core.errors import ConfigError

    directory = os.path.dirname(os.path.abspath(uds_path))
    if not os.path.isdir(directory):
        raise ConfigError(f"the directory of {uds_path} does not exist", key="uds_path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                         | socket.SOCK_CLOEXEC)
    try:
        if os.path.lexists(uds_path):
            _remove_stale(uds_path)
        sock.bind(uds_path)
        sock.listen(64)
    except ConfigError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {uds_path}: {exc.strerror}",
                          key="uds_path") from None
    return sock


def _remove_stale(path: str) -> None:
    import stat

    from stellarium_core.errors import ConfigError

    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ConfigError(f"{path} exists and is not a socket", key="uds_path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        os.unlink(path)                      # nobody listens: a stale socket
        return
    finally:
        probe.close()
    raise ConfigError(f"{path} is in use: another VMM listens on it", key="uds_path")
