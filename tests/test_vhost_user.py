"""The vhost-user back-end over a real unix socket, driven by a front-end written here.

The front-end shares a sealed memfd as guest RAM and drives the virtio-stellar
device (from the plugin registry) over a real Stellarium volume. Hostile
front-ends send bad memory tables, unknown requests, or drop the socket in the
middle of a message or request: each gets a logged error, the volume stays
consistent (NEBULA fsck clean) and the server keeps serving other clients.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.virtio_driver import AVAIL, DESC, QSIZE, USED, BlkDriver
from stellarium_core.hookspecs import DeviceContext
from stellarium_core.host import Host, init_store
from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    MemoryRegion,
    QueueEventfds,
    RegionMemory,
    Virtqueue,
)
from stellarium_core.virtio import vhost_user as vu
from stellarium_core.volumes.volume import VolumeStore

pytest.importorskip("stellarium_virtio_stellar",
                    reason="the virtio-stellar device plugin is not installed")

MIB = 1 << 20
MEM = 2 * MIB
USER_BASE = 0x7F00_0000_0000          # where the front-end "maps" guest RAM
DISK = MIB
SECTOR = 512
T_IN, T_OUT, T_FLUSH = 0, 1, 4
WAIT = 30.0                            # a hang guard, not a timing assertion


def sealed_memfd(size: int, seals: int = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Frontend:
    """A vhost-user front-end: guest RAM in a memfd, one split ring, eventfds."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.memfd = sealed_memfd(MEM)
        self.ram = mmap.mmap(self.memfd, MEM)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.driver = BlkDriver(self.ram, lambda: os.eventfd_write(self.kick, 1),
                                self._wait_call)

    def close(self) -> None:
        self.sock.close()
        self.ram.close()
        for fd in (self.memfd, self.kick, self.call):
            os.close(fd)

    # -- messages --------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (),
             need_reply: bool = False) -> None:
        flags = vu.VERSION | (vu.FLAG_NEED_REPLY if need_reply else 0)
        msg = vu.HEADER.pack(request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([msg], anc)

    def reply(self, request: int) -> bytes:
        hdr = self._exact(vu.HEADER.size)
        req, flags, size = vu.HEADER.unpack(hdr)
        assert req == request and flags == vu.VERSION | vu.FLAG_REPLY, (req, flags)
        return self._exact(size)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError("the back-end closed the connection")
            buf += part
        return buf

    def ask(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> int:
        """Send with need_reply; the u64 status the back-end acknowledges with."""
        self.send(request, payload, fds, need_reply=True)
        return vu.U64.unpack(self.reply(request))[0]

    def closed_by_backend(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def mem_table(self, *regions: tuple[int, int, int, int]) -> bytes:
        return struct.pack("<II", len(regions), 0) + b"".join(
            vu.REGION.pack(*r) for r in regions)

    def negotiate(self) -> int:
        self.send(vu.SET_OWNER)
        self.send(vu.GET_FEATURES)
        features = vu.U64.unpack(self.reply(vu.GET_FEATURES))[0]
        assert features & vu.F_PROTOCOL_FEATURES and features & VIRTIO_F_VERSION_1
        self.send(vu.GET_PROTOCOL_FEATURES)
        proto = vu.U64.unpack(self.reply(vu.GET_PROTOCOL_FEATURES))[0]
        assert proto & vu.PROTOCOL_F_CONFIG and proto & vu.PROTOCOL_F_REPLY_ACK
        self.send(vu.SET_PROTOCOL_FEATURES, vu.U64.pack(proto))
        self.send(vu.SET_FEATURES, vu.U64.pack(features))
        self.features = features
        return features

    def start(self) -> None:
        """The rest of a front-end's start sequence, as QEMU sends it."""
        self.negotiate()
        assert self.ask(vu.SET_MEM_TABLE, self.mem_table((0, MEM, USER_BASE, 0)),
                        (self.memfd,)) == 0
        self.send(vu.SET_VRING_NUM, vu.STATE.pack(0, QSIZE))
        self.send(vu.SET_VRING_BASE, vu.STATE.pack(0, 0))
        self.send(vu.SET_VRING_ADDR, vu.ADDR.pack(0, 0, USER_BASE + DESC, USER_BASE + USED,
                                                  USER_BASE + AVAIL, 0))
        self.send(vu.SET_VRING_KICK, vu.U64.pack(0), (self.kick,))
        self.send(vu.SET_VRING_CALL, vu.U64.pack(0), (self.call,))
        assert self.ask(vu.SET_VRING_ENABLE, vu.STATE.pack(0, 1)) == 0

    def request(self, rtype: int, sector: int = 0, out: bytes = b"",
                inlen: int = 0) -> tuple[int, bytes]:
        return self.driver.request(rtype, sector, out, inlen)

    def _wait_call(self) -> None:
        """Until the used ring moved; every wait is woken by the call eventfd."""
        while struct.unpack_from("<H", self.ram, USED + 2)[0] == self.driver.used_seen & 0xFFFF:
            r, _, _ = select.select([self.call], [], [], WAIT)
            assert r, "no used-buffer notification on the call eventfd"
            os.eventfd_read(self.call)


# -- fixtures: a real store, a volume, a running server ----------------------------------


@pytest.fixture(autouse=True)
def _server_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=vu.__name__)


@pytest.fixture
def host_cfg(tmp_path: Path) -> Path:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    host = Host.from_config(cfg)
    init_store(host)
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(DISK))
    with host.store as store:
        VolumeStore(host.store_path / "volumes", store, host.hasher) \
            .import_raw("disk", image).close()
    return cfg


def volume_bytes(cfg: Path) -> bytes:
    host = Host.from_config(cfg)
    with host.store as store, \
            VolumeStore(host.store_path / "volumes", store, host.hasher).open(
                "disk", readonly=True) as v:
        data = v.read(0, DISK)
        report = store.fsck()
    assert report.ok, report
    return data


class Server:
    def __init__(self, path: Path, cfg: Path, readonly: bool = False) -> None:
        host = Host.from_config(cfg)
        context, params = DeviceContext(host), {"volume": "disk", "readonly": readonly}
        self.srv = vu.VhostUserServer(path, lambda: host.registry.create(
            "device", "virtio-stellar", params, context=context))
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.srv.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


@pytest.fixture
def serve(tmp_path: Path, host_cfg: Path) -> Iterator[tuple[Path, Server]]:
    sock = tmp_path / "vhost.sock"
    s = Server(sock, host_cfg)
    yield sock, s
    s.stop()


def wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def served_ok(sock: Path) -> None:
    """A well-behaved client connects and reads sector 0 (once the previous one let go)."""
    fe = Frontend(sock)
    try:
        fe.start()
        status, data = fe.request(T_IN, 0, inlen=SECTOR)
        assert status == 0 and len(data) == SECTOR
    finally:
        fe.close()


def dropped(fe: Frontend, sock: Path, caplog: pytest.LogCaptureFixture, message: str) -> None:
    """The back-end closed ``fe``'s connection, logged ``message``, and serves the next client."""
    assert fe.closed_by_backend()
    fe.close()
    wait_for(lambda: message in caplog.text, f"the logged error {message!r}")
    served_ok(sock)


# -- the good path ---------------------------------------------------------------------


def test_frontend_writes_and_reads_a_volume_through_the_shared_ring(serve, host_cfg, caplog):
    sock, _ = serve
    before = volume_bytes(host_cfg)
    fe = Frontend(sock)
    fe.start()
    fe.send(vu.GET_QUEUE_NUM)
    assert vu.U64.unpack(fe.reply(vu.GET_QUEUE_NUM))[0] == 1
    fe.send(vu.GET_CONFIG, vu.CONFIG_HDR.pack(0, 60, 0) + bytes(60))
    cfg = fe.reply(vu.GET_CONFIG)
    assert vu.CONFIG_HDR.unpack_from(cfg) == (0, 60, 0)
    assert struct.unpack_from("<Q", cfg, vu.CONFIG_HDR.size)[0] == DISK // SECTOR

    assert fe.request(T_IN, 8, inlen=4096) == (0, before[8 * SECTOR:8 * SECTOR + 4096])
    new = os.urandom(3 * SECTOR)
    assert fe.request(T_OUT, 127, out=new) == (0, b"")       # crosses a 64 KiB chunk edge
    assert fe.request(T_FLUSH) == (0, b"")
    assert fe.request(T_IN, 127, inlen=len(new)) == (0, new)
    # The device offers EVENT_IDX and the front-end took it: the back-end publishes
    # avail_event, without which a Linux driver stops kicking after its first request.
    assert fe.features & VIRTIO_RING_F_EVENT_IDX
    assert struct.unpack_from("<H", fe.ram, USED + 4 + 8 * QSIZE)[0] == 4
    fe.send(vu.GET_VRING_BASE, vu.STATE.pack(0, 0))
    assert vu.STATE.unpack(fe.reply(vu.GET_VRING_BASE)) == (0, 4)
    fe.close()
    wait_for(lambda: "client 1: disconnected" in caplog.text, "the disconnect")
    want = bytearray(before)
    want[127 * SECTOR:130 * SECTOR] = new
    assert volume_bytes(host_cfg) == want


def test_cli_serves_a_volume_until_sigterm(tmp_path, host_cfg):
    sock = tmp_path / "cli.sock"
    proc = subprocess.Popen([sys.executable, "-m", "stellarium_core", "--config", str(host_cfg),
                             "vol", "serve", "disk", "--vhost-user", str(sock), "--readonly"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.is_socket, "the socket")
        fe = Frontend(sock)
        fe.start()
        assert fe.request(T_OUT, 0, out=b"x" * SECTOR)[0] == 1      # read-only: IOERR
        assert fe.request(T_IN, 0, inlen=SECTOR)[0] == 0
        fe.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert "serving volume disk (read-only)" in out and "client 1: disconnected" in err
    assert not sock.exists()


def test_cli_refuses_a_missing_volume(tmp_path, host_cfg):
    r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(host_cfg),
                        "vol", "serve", "nope", "--vhost-user", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1 and "no volume named 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


# -- hostile front-ends ------------------------------------------------------------------


def _plain_file(tmp_path: Path) -> int:
    fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, MEM)
    return fd


BAD_TABLES = {
    "unsealed memfd": (lambda tp: sealed_memfd(MEM, seals=0), [(0, MEM, USER_BASE, 0)],
                       "not sealed against shrinking"),
    "plain file": (_plain_file, [(0, MEM, USER_BASE, 0)], "not a memfd"),
    "past the end": (lambda tp: sealed_memfd(MEM), [(0, 2 * MEM, USER_BASE, 0)],
                     "past the end of its memfd"),
    "offset past the end": (lambda tp: sealed_memfd(MEM), [(0, MEM, USER_BASE, 4096)],
                            "past the end of its memfd"),
    "empty region": (lambda tp: sealed_memfd(MEM), [(0, 0, USER_BASE, 0)], "is empty"),
    "wraps": (lambda tp: sealed_memfd(MEM), [(2**64 - 4096, MEM, USER_BASE, 0)], "wraps"),
    "overlap": (lambda tp: sealed_memfd(MEM), [(0, MEM, USER_BASE, 0),
                                               (MEM // 2, MEM, USER_BASE + 4 * MEM, 0)],
                "overlap in guest addresses"),
    "nine regions": (lambda tp: sealed_memfd(MEM),
                     [(i * MEM, MEM, USER_BASE + i * MEM, 0) for i in range(9)],
                     "regions in a"),
}


@pytest.mark.parametrize("case", BAD_TABLES)
def test_bad_memory_table_is_refused_and_others_are_still_served(serve, host_cfg, tmp_path,
                                                                 caplog, case):
    sock, _ = serve
    make_fd, regions, message = BAD_TABLES[case]
    before = volume_bytes(host_cfg)
    fe = Frontend(sock)
    fe.negotiate()
    fd = make_fd(tmp_path)
    try:
        fds = (fd,) * min(len(regions), vu.MAX_FDS)
        assert fe.ask(vu.SET_MEM_TABLE, fe.mem_table(*regions), fds) != 0
    finally:
        os.close(fd)
    dropped(fe, sock, caplog, message)
    assert volume_bytes(host_cfg) == before


def test_fd_count_must_match_the_table(serve, caplog):
    sock, _ = serve
    fe = Frontend(sock)
    fe.negotiate()
    table = fe.mem_table((0, MEM, USER_BASE, 0), (MEM, MEM, USER_BASE + MEM, 0))
    assert fe.ask(vu.SET_MEM_TABLE, table, (fe.memfd,)) != 0
    dropped(fe, sock, caplog, "2 regions but 1 file descriptors")


def test_unknown_requests_are_refused_and_the_client_carries_on(serve, caplog):
    sock, _ = serve
    fe = Frontend(sock)
    fe.negotiate()
    efd = os.eventfd(0)
    assert fe.ask(999, b"junk" * 4, (efd,)) == 1
    os.close(efd)
    fe.send(77)                                        # no reply asked: just logged
    fe.start()
    assert fe.request(T_IN, 0, inlen=SECTOR)[0] == 0
    fe.close()
    assert "unknown request 999 (16-byte payload, 1 fds) refused" in caplog.text
    assert "unknown request 77" in caplog.text


@pytest.mark.parametrize("payload", [
    vu.HEADER.pack(vu.SET_FEATURES, vu.VERSION, 8) + b"\1\2",            # payload cut short
    vu.HEADER.pack(vu.SET_MEM_TABLE, vu.VERSION, 264)[:7],               # header cut short
])
def test_socket_dropped_mid_message_is_logged_and_others_are_served(serve, host_cfg, caplog,
                                                                    payload):
    sock, _ = serve
    before = volume_bytes(host_cfg)
    fe = Frontend(sock)
    fe.sock.sendall(payload)
    fe.close()
    wait_for(lambda: "dropped the socket in the middle of a message" in caplog.text,
             "the logged error")
    served_ok(sock)
    assert volume_bytes(host_cfg) == before


@pytest.mark.parametrize("header, message", [
    (vu.HEADER.pack(vu.GET_FEATURES, 0x2, 0), "protocol version 2"),
    (vu.HEADER.pack(vu.SET_MEM_TABLE, vu.VERSION, 1 << 30), "1073741824-byte payload"),
    (vu.HEADER.pack(vu.SET_VRING_NUM, vu.VERSION, 8) + vu.STATE.pack(5, 64),
     "vring 5 does not exist"),
    (vu.HEADER.pack(vu.SET_VRING_NUM, vu.VERSION, 8) + vu.STATE.pack(0, 100),
     "size 100 is not a power of two"),
    (vu.HEADER.pack(vu.SET_VRING_NUM, vu.VERSION, 8) + vu.STATE.pack(0, 65536),
     "size 65536 is not a power of two <= 32768"),
    (vu.HEADER.pack(vu.SET_FEATURES, vu.VERSION, 8) + vu.U64.pack(1 << 63),
     "were not offered"),
    (vu.HEADER.pack(vu.SET_FEATURES, vu.VERSION, 4) + b"\0" * 4, "need 8"),
])
def test_malformed_messages_end_that_client_only(serve, caplog, header, message):
    sock, _ = serve
    fe = Frontend(sock)
    fe.sock.sendall(header)
    dropped(fe, sock, caplog, message)


def test_kick_that_is_not_an_eventfd_is_refused(serve, caplog):
    sock, _ = serve
    fe = Frontend(sock)
    fe.negotiate()
    r, w = os.pipe()
    fe.send(vu.SET_VRING_KICK, vu.U64.pack(0), (r,))
    os.close(r)
    os.close(w)
    dropped(fe, sock, caplog, "not an eventfd")


def test_ring_outside_guest_memory_is_refused(serve, caplog):
    sock, _ = serve
    fe = Frontend(sock)
    fe.negotiate()
    assert fe.ask(vu.SET_MEM_TABLE, fe.mem_table((0, MEM, USER_BASE, 0)), (fe.memfd,)) == 0
    fe.send(vu.SET_VRING_ADDR, vu.ADDR.pack(0, 0, USER_BASE + MEM - 16, USER_BASE + USED,
                                            USER_BASE + AVAIL, 0))
    fe.send(vu.SET_VRING_KICK, vu.U64.pack(0), (fe.kick,))
    dropped(fe, sock, caplog, "in no memory region")


def test_dropping_the_socket_mid_request_leaves_the_volume_consistent(serve, host_cfg, caplog):
    sock, _ = serve
    before = volume_bytes(host_cfg)
    new = os.urandom(64 * SECTOR)
    fe = Frontend(sock)
    fe.start()
    fe.driver.submit([(struct.pack("<IIQ", T_OUT, 0, 100), False), (new, False),
                      (1, True)])                      # kick, then vanish at once
    fe.close()
    wait_for(lambda: "client 1: disconnected" in caplog.text, "the disconnect")
    got = volume_bytes(host_cfg)                       # fsck clean (inside)
    assert got[100 * SECTOR:164 * SECTOR] in (new, before[100 * SECTOR:164 * SECTOR])
    assert got[:100 * SECTOR] == before[:100 * SECTOR]
    assert got[164 * SECTOR:] == before[164 * SECTOR:]
    served_ok(sock)


def test_writable_volume_takes_one_client_at_a_time(serve, caplog):
    sock, _ = serve
    first = Frontend(sock)
    first.start()
    second = Frontend(sock)
    assert second.closed_by_backend()
    second.close()
    assert "client 2: no device for this client" in caplog.text
    assert "open for writing elsewhere" in caplog.text
    assert first.request(T_IN, 0, inlen=SECTOR)[0] == 0   # the first is unaffected
    first.close()


def test_read_only_export_serves_clients_side_by_side_despite_a_stalled_one(
        tmp_path, host_cfg, caplog):
    sock = tmp_path / "ro.sock"
    s = Server(sock, host_cfg, readonly=True)
    stalled = Frontend(sock)
    stalled.sock.sendall(vu.HEADER.pack(vu.SET_MEM_TABLE, vu.VERSION, 264)[:5])
    a, b = Frontend(sock), Frontend(sock)
    a.start()
    b.start()
    want = volume_bytes(host_cfg)[:SECTOR]
    assert a.request(T_IN, 0, inlen=SECTOR) == (0, want)
    assert b.request(T_IN, 0, inlen=SECTOR) == (0, want)
    s.stop()                            # wakes the stalled client too, and returns
    for fe in (stalled, a, b):
        assert fe.closed_by_backend()
        fe.close()


def test_server_log_names_the_client(serve, caplog):
    sock, _ = serve
    served_ok(sock)
    wait_for(lambda: "client 1: memory table: 0x0+0x200000" in caplog.text, "the log line")


def test_reset_device_then_restart_and_config_writes(serve, caplog):
    sock, _ = serve
    fe = Frontend(sock)
    fe.start()
    assert fe.request(T_IN, 0, inlen=SECTOR)[0] == 0
    assert fe.ask(vu.SET_CONFIG, vu.CONFIG_HDR.pack(250, 16, 0) + bytes(16)) == 1
    assert "SET_CONFIG of 16 bytes at 250 does not fit" in caplog.text
    fe.send(vu.GET_CONFIG, vu.CONFIG_HDR.pack(250, 16, 0) + bytes(16))
    assert vu.CONFIG_HDR.unpack(fe.reply(vu.GET_CONFIG)) == (250, 0, 0)   # the spec's error
    assert fe.ask(vu.RESET_DEVICE) == 0
    fe.driver = BlkDriver(fe.ram, fe.driver.kick, fe._wait_call)           # a fresh ring
    fe.ram[:] = bytes(MEM)
    fe.start()
    assert fe.request(T_IN, 0, inlen=SECTOR)[0] == 0
    fe.close()


# -- the front-end half: what Volt's --device vhost-user-blk runs -----------------------


class HandoverLink:
    """What a VMM gives a front-end device: each queue's kick and call eventfds."""

    def __init__(self) -> None:
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def queue_eventfds(self, queue: int) -> QueueEventfds:
        return QueueEventfds(self.kick, self.call)


def test_volt_frontend_serves_a_guest_ring_from_the_volume_server(serve, host_cfg, caplog):
    """The front-end device from the registry hands a sealed memfd and the ring to the
    back-end; requests then go guest ring -> back-end -> call eventfd with no front-end
    code in the path. A reset stops the back-end's ring; the volume stays consistent."""
    sock, _ = serve
    before = volume_bytes(host_cfg)
    host = Host.from_config(host_cfg)
    dev = host.registry.create("device", "vhost-user-blk", {"socket": str(sock)},
                               context=DeviceContext(host))
    assert dev.device_id == 2 and dev.features & VIRTIO_F_VERSION_1
    assert struct.unpack("<Q", dev.read_config(0, 8))[0] == DISK // SECTOR   # capacity
    memfd = sealed_memfd(MEM)
    ram = mmap.mmap(memfd, MEM)
    link = HandoverLink()
    mem = RegionMemory([(MemoryRegion(0, MEM, USER_BASE, memfd, 0), memoryview(ram))])
    try:
        q = Virtqueue(QSIZE)
        q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
        dev.attach(link)
        dev.activate(dev.features, mem, [q], lambda: pytest.fail("interrupts are eventfds"))

        def wait() -> None:
            r, _, _ = select.select([link.call], [], [], WAIT)
            assert r, "no used-buffer notification on the call eventfd"
            os.eventfd_read(link.call)

        drv = BlkDriver(ram, lambda: os.eventfd_write(link.kick, 1), wait)
        assert drv.request(T_IN, 8, inlen=4096) == (0, before[8 * SECTOR:8 * SECTOR + 4096])
        new = os.urandom(2 * SECTOR)
        assert drv.request(T_OUT, 3, out=new) == (0, b"")
        assert drv.request(T_FLUSH) == (0, b"")
        dev.reset()
        wait_for(lambda: "client 1" in caplog.text, "the client")
    finally:
        dev.close()
        mem.release()
        ram.close()
        for fd in (memfd, link.kick, link.call):
            os.close(fd)
    wait_for(lambda: "client 1: disconnected" in caplog.text, "the disconnect")
    want = bytearray(before)
    want[3 * SECTOR:5 * SECTOR] = new
    assert volume_bytes(host_cfg) == want


def test_volt_frontend_reports_a_missing_or_silent_back_end(tmp_path):
    from stellarium_core.virtio.vhost_frontend import VhostUserError, VhostUserFrontend

    with pytest.raises(VhostUserError, match="cannot connect"):
        VhostUserFrontend(str(tmp_path / "nobody.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "rude.sock"))
    listener.listen(1)

    def rude() -> None:
        conn, _ = listener.accept()
        conn.recv(12)
        conn.sendall(vu.HEADER.pack(999, vu.VERSION | vu.FLAG_REPLY, 8) + bytes(8))
        conn.close()

    t = threading.Thread(target=rude, daemon=True)
    t.start()
    with pytest.raises(VhostUserError, match="bad reply to request 1"):
        VhostUserFrontend(str(tmp_path / "rude.sock"))
    t.join(WAIT)
    listener.close()
