"""A vhost-user back-end: serve any :class:`VirtioDevice` to another VMM over a unix socket.

The front-end (QEMU's ``vhost-user-blk``, Volt) keeps the guest and its
virtio transport; it sends its guest RAM as memfds (SET_MEM_TABLE), the ring
addresses and one eventfd per ring to kick us and one to call it back. We then
run the same device model Volt runs in-process, on the shared rings. The message
set follows QEMU's docs/interop/vhost-user.rst; split rings only.

Each client gets its own device from ``device_factory`` and its own thread.
A front-end is untrusted: a malformed message, a bad memory table or a
socket dropped mid-message is logged and ends that client only (its device is
reset and closed, which flushes it); unknown requests are logged and refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stellarium_core.errors import StellarError
from stellarium_core.virtio.device import VirtioDevice
from stellarium_core.virtio.mapped_memory import (
    MAX_REGIONS,
    MappedMemory,
    MemoryTableError,
    RegionSpec,
)
from stellarium_core.virtio.queue import MAX_QUEUE_SIZE, VIRTIO_RING_F_EVENT_IDX, Virtqueue

log = logging.getLogger(__name__)

(GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD,
 SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL,
 SET_VRING_ERR, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
 SET_VRING_ENABLE) = range(1, 19)
GET_CONFIG, SET_CONFIG = 24, 25
RESET_DEVICE = 34

#: Feature bit 30: the back-end speaks GET/SET_PROTOCOL_FEATURES.
F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_RESET_DEVICE = 1 << 13
PROTOCOL_FEATURES = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG \
    | PROTOCOL_F_RESET_DEVICE

HEADER = struct.Struct("<III")          # request, flags, payload size
VERSION, FLAG_REPLY, FLAG_NEED_REPLY = 0x1, 0x4, 0x8
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")            # vring index, num
ADDR = struct.Struct("<IIQQQQ")         # index, flags, desc, used, avail, log
REGION = struct.Struct("<QQQQ")         # guest addr, size, user addr, mmap offset
CONFIG_HDR = struct.Struct("<III")      # offset, size, flags
VRING_NOFD = 1 << 8
VRING_INDEX_MASK = 0xFF
MAX_CONFIG = 256
#: No legitimate request carries more (a full memory table is 264 bytes).
MAX_PAYLOAD = 4096
MAX_FDS = MAX_REGIONS


class ProtocolError(Exception):
    """The front-end broke the protocol; ``fatal`` ones end the client."""

    def __init__(self, message: str, *, fatal: bool = True) -> None:
        super().__init__(message)
        self.fatal = fatal


class _Disconnected(Exception):
    """The socket closed; ``clean`` when it did so between messages."""

    def __init__(self, clean: bool) -> None:
        super().__init__()
        self.clean = clean


@dataclass
class _Ring:
    """One vring as the front-end configures it."""

    queue: Virtqueue
    addrs: tuple[int, int, int] | None = None      # front-end addresses: desc, avail, used
    kick: int | None = None
    call: int | None = None
    enabled: bool = False
    started: bool = False

    def close_fds(self) -> None:
        for fd in (self.kick, self.call):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = None


class Client:
    """One connected front-end: its message loop, its memory, rings and device."""

    def __init__(self, sock: socket.socket, device: VirtioDevice, name: str,
                 stop_fd: int) -> None:
        self.sock, self.device, self.name, self._stop_fd = sock, device, name, stop_fd
        self.mem = MappedMemory()
        # A front-end may size a ring up to the virtio maximum: vhost-user has no way
        # to tell it the device's preferred maximum (virtio-mmio's QueueNumMax).
        self.rings = [_Ring(Virtqueue(MAX_QUEUE_SIZE)) for _ in device.queue_sizes]
        self.features = 0
        self.protocol_features = 0
        self.active = False
        self._sel = selectors.DefaultSelector()
        self._handlers = {
            GET_FEATURES: self._get_features, SET_FEATURES: self._set_features,
            SET_OWNER: self._nothing, RESET_OWNER: self._reset,
            SET_MEM_TABLE: self._set_mem_table, SET_VRING_NUM: self._set_vring_num,
            SET_VRING_ADDR: self._set_vring_addr, SET_VRING_BASE: self._set_vring_base,
            GET_VRING_BASE: self._get_vring_base, SET_VRING_KICK: self._set_vring_kick,
            SET_VRING_CALL: self._set_vring_call, SET_VRING_ERR: self._set_vring_err,
            GET_PROTOCOL_FEATURES: self._get_protocol_features,
            SET_PROTOCOL_FEATURES: self._set_protocol_features,
            GET_QUEUE_NUM: self._get_queue_num, SET_VRING_ENABLE: self._set_vring_enable,
            GET_CONFIG: self._get_config, SET_CONFIG: self._set_config,
            RESET_DEVICE: self._reset,
        }

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        """Serve messages and kicks until the front-end leaves or the server stops."""
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._sel.register(self._stop_fd, selectors.EVENT_READ, -1)
        try:
            while True:
                for key, _ in self._sel.select():
                    if key.data == -1:
                        return
                    if key.data is None:
                        self._message()
                    else:
                        self._kicked(key.data)
        except _Disconnected as exc:
            if exc.clean:
                log.info("%s: disconnected", self.name)
            else:
                log.error("%s: the front-end dropped the socket in the middle of a message",
                          self.name)
        except ProtocolError as exc:
            log.error("%s: %s; closing the connection", self.name, exc)
        except Exception as exc:         # a device bug must not take other clients down
            log.error("%s: internal error, closing the connection: %s: %s", self.name,
                      type(exc).__name__, exc)
        finally:
            self._close()

    def _message(self) -> None:
        fds: list[int] = []
        try:
            raw = self._recv(HEADER.size, fds, first=True)
            request, flags, size = HEADER.unpack(raw)
            if flags & 0x3 != VERSION:
                raise ProtocolError(f"message {request} has protocol version {flags & 3}, "
                                    f"not {VERSION}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"message {request} announces a {size}-byte payload "
                                    f"(at most {MAX_PAYLOAD})")
            payload = self._recv(size, fds) if size else b""
            self._dispatch(request, flags, payload, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def _recv(self, n: int, fds: list[int], first: bool = False) -> bytes:
        """Exactly ``n`` bytes; fds that arrive with them are appended to ``fds``."""
        buf = b""
        while len(buf) < n:
            data, anc, msg_flags, _ = self.sock.recvmsg(
                n - len(buf), socket.CMSG_SPACE(MAX_FDS * 4))
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(blob) - len(blob) % 4
                    fds.extend(struct.unpack(f"<{usable // 4}i", blob[:usable]))
            if msg_flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {MAX_FDS} file descriptors in one message")
            if not data:
                raise _Disconnected(clean=first and not buf)
            buf += data
        return buf

    def _dispatch(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        handler = self._handlers.get(request)
        ack = flags & FLAG_NEED_REPLY and self.protocol_features & PROTOCOL_F_REPLY_ACK
        if handler is None:
            log.error("%s: unknown request %d (%d-byte payload, %d fds) refused",
                      self.name, request, len(payload), len(fds))
            if ack:
                self._reply(request, U64.pack(1))
            return
        try:
            reply = handler(payload, fds)
        except (ProtocolError, ValueError, OSError) as exc:   # incl. bad tables and rings
            fatal = exc.fatal if isinstance(exc, ProtocolError) else True
            if not fatal:
                log.error("%s: request %d refused: %s", self.name, request, exc)
            if ack:
                self._reply(request, U64.pack(1))
            if fatal:
                raise ProtocolError(f"request {request}: {exc}") from None
            return
        if reply is not None:
            self._reply(request, reply)
        elif ack:
            self._reply(request, U64.pack(0))

    def _reply(self, request: int, payload: bytes) -> None:
        try:
            self.sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)
        except OSError:
            raise _Disconnected(clean=False) from None

    # -- payload helpers -----------------------------------------------------------

    @staticmethod
    def _unpack(fmt: struct.Struct, payload: bytes, what: str) -> tuple:
        if len(payload) < fmt.size:
            raise ProtocolError(f"{what}: payload of {len(payload)} bytes, need {fmt.size}")
        return fmt.unpack_from(payload)

    def _ring(self, index: int) -> _Ring:
        if index >= len(self.rings):
            raise ProtocolError(f"vring {index} does not exist (the device has "
                                f"{len(self.rings)})")
        return self.rings[index]

    def _take_fd(self, payload: bytes, fds: list[int], what: str) -> tuple[_Ring, int | None]:
        """The ring named by a u64 payload and the eventfd that came with it (now ours).

        It is made non-blocking, so a front-end draining or flooding its own
        eventfds cannot make us block on them.
        """
        (value,) = self._unpack(U64, payload, what)
        ring = self._ring(value & VRING_INDEX_MASK)
        if value & VRING_NOFD:
            return ring, None
        if len(fds) != 1:
            raise ProtocolError(f"{what}: expected one file descriptor, got {len(fds)}")
        if os.readlink(f"/proc/self/fd/{fds[0]}") != "anon_inode:[eventfd]":
            raise ProtocolError(f"{what}: the file descriptor is not an eventfd")
        fd = fds.pop()
        os.set_blocking(fd, False)
        return ring, fd

    # -- handlers ------------------------------------------------------------------

    def _nothing(self, payload: bytes, fds: list[int]) -> None:
        return None

    def _get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(self.device.features | F_PROTOCOL_FEATURES)

    def _set_features(self, payload: bytes, fds: list[int]) -> None:
        (value,) = self._unpack(U64, payload, "SET_FEATURES")
        extra = value & ~(self.device.features | F_PROTOCOL_FEATURES)
        if extra:
            raise ProtocolError(f"SET_FEATURES acks features {extra:#x} that were not offered")
        self.features = value & ~F_PROTOCOL_FEATURES
        if not value & F_PROTOCOL_FEATURES:       # rings then start enabled (spec)
            for r in self.rings:
                r.enabled = True

    def _get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        (value,) = self._unpack(U64, payload, "SET_PROTOCOL_FEATURES")
        if value & ~PROTOCOL_FEATURES:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES acks {value & ~PROTOCOL_FEATURES:#x}, "
                                "which were not offered")
        self.protocol_features = value

    def _get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(len(self.rings))

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        (count, _pad) = self._unpack(STATE, payload, "SET_MEM_TABLE")
        if not 1 <= count <= MAX_REGIONS or len(payload) < STATE.size + count * REGION.size:
            raise MemoryTableError(f"SET_MEM_TABLE: {count} regions in a {len(payload)}-byte "
                                   "payload")
        specs = [RegionSpec(*REGION.unpack_from(payload, STATE.size + i * REGION.size))
                 for i in range(count)]
        self.mem.load(specs, fds)      # the fds are closed after the message; maps stay
        log.info("%s: memory table: %s", self.name, ", ".join(
            f"{s.guest_addr:#x}+{s.size:#x}" for s in specs))
        for r in self.rings:
            if r.started:
                self._place(r)

    def _set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._unpack(STATE, payload, "SET_VRING_NUM")
        q = self._ring(index).queue
        if not 1 <= num <= q.max_size or num & (num - 1):
            raise ProtocolError(f"vring {index}: size {num} is not a power of two "
                                f"<= {q.max_size}")
        q.size = num

    def _set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        index, _flags, desc, used, avail, _log = self._unpack(ADDR, payload, "SET_VRING_ADDR")
        ring = self._ring(index)
        ring.addrs = (desc, avail, used)
        if ring.started:
            self._place(ring)

    def _set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._unpack(STATE, payload, "SET_VRING_BASE")
        self._ring(index).queue.last_avail = num & 0xFFFF

    def _get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        """Stop the ring and say where the next request would be read from."""
        index, _ = self._unpack(STATE, payload, "GET_VRING_BASE")
        ring = self._ring(index)
        self._stop_ring(ring)
        if self.active and not any(r.started for r in self.rings):
            self.device.reset()
            self.active = False
        return STATE.pack(index, ring.queue.last_avail)

    def _set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        ring, fd = self._take_fd(payload, fds, "SET_VRING_KICK")
        if fd is None:
            raise ProtocolError("SET_VRING_KICK without an eventfd: polling is not supported")
        self._stop_ring(ring)
        if ring.kick is not None:
            os.close(ring.kick)
        ring.kick = fd
        self._start_ring(ring)

    def _set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        ring, fd = self._take_fd(payload, fds, "SET_VRING_CALL")
        if ring.call is not None:
            os.close(ring.call)
        ring.call = fd
        if fd is not None and ring.queue.ready:
            os.eventfd_write(fd, 1)     # anything used before the fd arrived is announced

    def _set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        _ring, fd = self._take_fd(payload, fds, "SET_VRING_ERR")
        if fd is not None:              # errors are logged here, not signalled
            os.close(fd)

    def _set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, num = self._unpack(STATE, payload, "SET_VRING_ENABLE")
        ring = self._ring(index)
        ring.enabled = bool(num)
        ring.queue.ready = ring.started and ring.enabled
        if ring.queue.ready:
            self._kicked(index)

    def _get_config(self, payload: bytes, fds: list[int]) -> bytes:
        offset, size, flags = self._unpack(CONFIG_HDR, payload, "GET_CONFIG")
        if size > MAX_CONFIG or offset + size > MAX_CONFIG:
            log.error("%s: GET_CONFIG of %d bytes at %d is outside the config space",
                      self.name, size, offset)
            return CONFIG_HDR.pack(offset, 0, flags)       # zero size: the spec's error
        return CONFIG_HDR.pack(offset, size, flags) + self.device.read_config(offset, size)

    def _set_config(self, payload: bytes, fds: list[int]) -> None:
        offset, size, _flags = self._unpack(CONFIG_HDR, payload, "SET_CONFIG")
        data = payload[CONFIG_HDR.size:CONFIG_HDR.size + size]
        if len(data) != size or offset + size > MAX_CONFIG:
            raise ProtocolError(f"SET_CONFIG of {size} bytes at {offset} does not fit",
                                fatal=False)
        self.device.write_config(offset, data)

    def _reset(self, payload: bytes, fds: list[int]) -> None:
        for r in self.rings:
            self._stop_ring(r)
            r.queue.reset()
            r.enabled = False
        if self.active:
            self.device.reset()
            self.active = False
        self.features = 0

    # -- rings ---------------------------------------------------------------------

    def _place(self, ring: _Ring) -> None:
        """Translate the ring's front-end addresses to guest ones and check the layout."""
        q = ring.queue
        if ring.addrs is None:
            raise ProtocolError("a ring was started before SET_VRING_ADDR")
        desc, avail, used = ring.addrs
        q.desc_addr = self.mem.user_to_guest(desc, 16 * q.size)
        q.avail_addr = self.mem.user_to_guest(avail, 6 + 2 * q.size)
        q.used_addr = self.mem.user_to_guest(used, 6 + 8 * q.size)
        q.check(self.mem)

    def _start_ring(self, ring: _Ring) -> None:
        self._place(ring)
        q = ring.queue
        q.used_idx = struct.unpack("<H", self.mem.read(q.used_addr + 2, 2))[0]
        ring.started = True
        q.ready = ring.enabled
        q.event_idx = bool(self.features & VIRTIO_RING_F_EVENT_IDX)
        self._sel.register(ring.kick, selectors.EVENT_READ, self.rings.index(ring))
        if not self.active:
            self.device.activate(self.features, self.mem, [r.queue for r in self.rings],
                                 self._interrupt)
            self.active = True
        if q.ready:
            self._kicked(self.rings.index(ring))

    def _stop_ring(self, ring: _Ring) -> None:
        if ring.started and ring.kick is not None:
            self._sel.unregister(ring.kick)
        ring.started = False
        ring.queue.ready = False

    def _kicked(self, index: int) -> None:
        ring = self.rings[index]
        if ring.kick is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(ring.kick)
        if ring.queue.ready and self.active:
            self.device.notify(index)

    def _interrupt(self) -> None:
        """The device used buffers: call every started ring (one line, as on virtio-mmio)."""
        for r in self.rings:
            if r.started and r.call is not None:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(r.call, 1)

    def _close(self) -> None:
        try:
            if self.active:
                self.device.reset()
            release(self.device)
        finally:
            self._sel.close()
            self.mem.close()
            for r in self.rings:
                r.close_fds()
            self.sock.close()


def release(device: VirtioDevice) -> None:
    """Close a device that holds resources (a volume's writer lock, a file), if it has any."""
    close = getattr(device, "close", None)
    if close is not None:
        close()


class VhostUserServer:
    """Listens on a unix socket; each client gets a device from ``device_factory``.

    A factory failure (say, the volume is open for writing by another client)
    is logged and closes that connection; the server keeps listening.
    """

    def __init__(self, path: str | os.PathLike[str],
                 device_factory: Callable[[], VirtioDevice]) -> None:
        self.path = Path(path)
        self._factory = device_factory
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.path.is_socket():
                self.path.unlink()          # a stale socket of an earlier server
            # bound and listening under a temporary name, then renamed: a front-end that
            # sees the path can connect (no refused connection between bind and listen)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            self._listener.bind(str(tmp))
            self._listener.listen(8)
            os.rename(tmp, self.path)
        except OSError as exc:
            self._listener.close()
            os.close(self._stop)
            raise StellarError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self._count = 0

    def serve_forever(self) -> None:
        """Accept clients until :meth:`stop`; each runs in its own thread."""
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._stop, selectors.EVENT_READ)
        try:
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if self._stop in ready:
                    break
                conn, _ = self._listener.accept()
                self._socks = {s for s in self._socks if s.fileno() >= 0} | {conn}
                self._count += 1
                t = threading.Thread(target=self._client, args=(conn, f"client {self._count}"),
                                     name=f"vhost-user-{self._count}", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
                t.start()
        finally:
            sel.close()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            for s in self._socks:          # wakes a client blocked in the middle of a message
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            for t in self._threads:
                t.join()
            os.close(self._stop)

    def _client(self, conn: socket.socket, name: str) -> None:
        log.info("%s: connected", name)
        try:
            device = self._factory()
        except Exception as exc:
            log.error("%s: no device for this client: %s", name, exc)
            conn.close()
            return
        Client(conn, device, name, self._stop).run()

    def stop(self) -> None:
        """End :meth:`serve_forever` and every client (their devices are flushed)."""
        os.eventfd_write(self._stop, 1)
