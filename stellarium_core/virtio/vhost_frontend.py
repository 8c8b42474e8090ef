"""A vhost-user front-end: a virtio device whose queues another process serves.

``volt run --device vhost-user-blk,socket=PATH`` gives the guest a block device
served by any vhost-user-blk back-end (``stellar vol serve VOL --vhost-user PATH``,
QEMU's storage daemon, SPDK). The VMM keeps the virtio transport and the config
space; at activation it sends the back-end its guest RAM (the memfd regions, sealed
against shrinking and growing), the ring addresses, and each queue's kick eventfd
(KVM's ioeventfd) and call eventfd (KVM's irqfd) through ``link.queue_eventfds``, so
requests and completions then flow between the guest and the back-end with no VMM
code in the path. Messages follow QEMU's docs/interop/vhost-user.rst, as the
back-end in :mod:`stellarium_core.virtio.vhost_user` does.

A back-end is another process and may misbehave: a refused or malformed reply, or a
closed socket, is a :class:`VhostUserError` with what was asked; at creation that is
the device's error, at activation the transport marks the device NEEDS_RESET.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import StellarError
from stellarium_core.hookspecs import hookimpl
from stellarium_core.virtio.device import VIRTIO_F_VERSION_1, DeviceLink
from stellarium_core.virtio.memory import GuestMemory
from stellarium_core.virtio.queue import Virtqueue
from stellarium_core.virtio.vhost_user import (
    ADDR,
    CONFIG_HDR,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    GET_CONFIG,
    GET_FEATURES,
    GET_PROTOCOL_FEATURES,
    GET_VRING_BASE,
    HEADER,
    MAX_PAYLOAD,
    PROTOCOL_F_CONFIG,
    PROTOCOL_F_REPLY_ACK,
    REGION,
    SET_FEATURES,
    SET_MEM_TABLE,
    SET_OWNER,
    SET_PROTOCOL_FEATURES,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_KICK,
    SET_VRING_NUM,
    STATE,
    U64,
    VERSION,
)

NAME = "vhost-user-blk"
BLOCK_DEVICE_ID = 2
#: virtio_blk_config up to write_zeroes_may_unmap.
BLK_CONFIG_SIZE = 60
QUEUE_SIZE = 256
#: What we ask of the back-end's protocol, when it offers it.
WANTED_PROTOCOL = PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG
TIMEOUT = 10.0


class VhostUserError(StellarError):
    """The back-end refused a request, answered nonsense, or went away."""


class VhostUserFrontend:
    """One vhost-user back-end behind a virtio device of ``device_id``."""

    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str, device_id: int = BLOCK_DEVICE_ID,
                 config_size: int = BLK_CONFIG_SIZE) -> None:
        self.path, self.device_id = path, device_id
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(TIMEOUT)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise VhostUserError(f"cannot connect to the vhost-user back-end at {path}: "
                                 f"{exc.strerror or exc}") from None
        try:
            self._handshake(config_size)
        except BaseException:
            self._sock.close()
            raise
        self._link: DeviceLink | None = None
        self._started: list[int] = []

    def _handshake(self, config_size: int) -> None:
        offered = self._get_u64(GET_FEATURES)
        if not offered & VIRTIO_F_VERSION_1:
            raise VhostUserError(f"{self.path}: the back-end does not offer VIRTIO_F_VERSION_1")
        self._protocol = 0
        if offered & F_PROTOCOL_FEATURES:
            wanted = self._get_u64(GET_PROTOCOL_FEATURES) & WANTED_PROTOCOL
            self._send(SET_PROTOCOL_FEATURES, U64.pack(wanted))    # acks start after it
            self._protocol = wanted
        self._backend_features = offered
        #: What the guest is offered: the back-end's device features.
        self.features = offered & ~F_PROTOCOL_FEATURES
        self._send(SET_OWNER)
        self._config = bytes(config_size)
        if self._protocol & PROTOCOL_F_CONFIG:
            reply = self._call(GET_CONFIG, CONFIG_HDR.pack(0, config_size, 0) + bytes(config_size))
            _off, size, _flags = CONFIG_HDR.unpack_from(reply)
            if size != config_size or len(reply) < CONFIG_HDR.size + size:
                raise VhostUserError(f"{self.path}: GET_CONFIG returned {size} bytes of "
                                     f"config, asked for {config_size}")
            self._config = reply[CONFIG_HDR.size:CONFIG_HDR.size + size]

    # -- messages ----------------------------------------------------------------

    def _send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
              ack: bool = True) -> None:
        """Send a request that has no reply; with REPLY_ACK, wait for its status."""
        need = ack and bool(self._protocol & PROTOCOL_F_REPLY_ACK)
        self._write(request, payload, fds, FLAG_NEED_REPLY if need else 0)
        if need:
            (status,) = U64.unpack(self._reply(request, U64.size))
            if status:
                raise VhostUserError(f"{self.path}: the back-end refused request {request} "
                                     f"(status {status})")

    def _call(self, request: int, payload: bytes = b"") -> bytes:
        self._write(request, payload, (), 0)
        return self._reply(request)

    def _get_u64(self, request: int) -> int:
        return U64.unpack(self._call(request)[:U64.size].ljust(U64.size, b"\0"))[0]

    def _write(self, request: int, payload: bytes, fds: tuple[int, ...], flags: int) -> None:
        msg = HEADER.pack(request, VERSION | flags, len(payload)) + payload
        try:
            if fds:
                socket.send_fds(self._sock, [msg], list(fds))
            else:
                self._sock.sendall(msg)
        except OSError as exc:
            raise VhostUserError(f"{self.path}: sending request {request} failed: "
                                 f"{exc.strerror or exc}") from None

    def _reply(self, request: int, size: int | None = None) -> bytes:
        head = self._recv(HEADER.size, request)
        got, flags, length = HEADER.unpack(head)
        if got != request or not flags & FLAG_REPLY or length > MAX_PAYLOAD \
                or (size is not None and length != size):
            raise VhostUserError(f"{self.path}: bad reply to request {request} (request "
                                 f"{got}, flags {flags:#x}, {length} bytes)")
        return self._recv(length, request) if length else b""

    def _recv(self, n: int, request: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                data = self._sock.recv(n - len(buf))
            except OSError as exc:
                raise VhostUserError(f"{self.path}: no reply to request {request}: "
                                     f"{exc.strerror or exc}") from None
            if not data:
                raise VhostUserError(f"{self.path}: the back-end closed the connection "
                                     f"(request {request})")
            buf += data
        return buf

    # -- the VirtioDevice contract -------------------------------------------------

    def attach(self, link: DeviceLink) -> None:
        self._link = link

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """Config writes are not forwarded (virtio-blk's writeback toggle is not offered)."""

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        """Hand memory and rings to the back-end; its eventfds take over the queues."""
        if self._link is None:
            raise VhostUserError("a vhost-user device needs a VMM that hands queues over")
        regions = list(mem.regions)
        if not regions or any(r.fd < 0 for r in regions):
            raise VhostUserError("vhost-user needs guest memory another process can map "
                                 "(a memfd; not --ksm)")
        self._send(SET_FEATURES, U64.pack(features | (
            self._backend_features & F_PROTOCOL_FEATURES)))
        table = STATE.pack(len(regions), 0) + b"".join(
            REGION.pack(r.guest_addr, r.size, r.host_addr, r.fd_offset) for r in regions)
        self._send(SET_MEM_TABLE, table, tuple(r.fd for r in regions))

        def host(gpa: int) -> int:
            for r in regions:
                if r.guest_addr <= gpa < r.end:
                    return r.host_addr + gpa - r.guest_addr
            raise VhostUserError(f"ring address {gpa:#x} is outside guest memory")

        for i, q in enumerate(queues):
            if not q.ready:
                continue
            fds = self._link.queue_eventfds(i)
            self._send(SET_VRING_NUM, STATE.pack(i, q.size))
            self._send(SET_VRING_BASE, STATE.pack(i, q.last_avail))
            self._send(SET_VRING_ADDR, ADDR.pack(i, 0, host(q.desc_addr), host(q.used_addr),
                                                 host(q.avail_addr), 0))
            self._send(SET_VRING_CALL, U64.pack(i), (fds.call,))
            self._send(SET_VRING_KICK, U64.pack(i), (fds.kick,))
            if self._backend_features & F_PROTOCOL_FEATURES:
                self._send(SET_VRING_ENABLE, STATE.pack(i, 1))
            self._started.append(i)

    def notify(self, queue: int) -> None:
        """Never called: the queues were handed over to the back-end at activation."""

    def reset(self) -> None:
        """Stop the back-end's rings (it resets its device once none runs)."""
        started, self._started = self._started, []
        for i in started:
            try:
                self._call(GET_VRING_BASE, STATE.pack(i, 0))
            except VhostUserError:
                pass          # a back-end that is gone has stopped already

    def close(self) -> None:
        self._sock.close()


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VhostUserFrontend | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "socket": Field(str, doc="the back-end's vhost-user unix socket"),
    })
    if not os.path.exists(p["socket"]):
        raise VhostUserError(f"no vhost-user back-end socket at {p['socket']}")
    return VhostUserFrontend(p["socket"])
