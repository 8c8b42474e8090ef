"""Live migration between two Volt processes on this machine's /dev/kvm, with a guest that
counts: it counts on in the target, in another network namespace; only chunks the
target lacks are sent; and a link cut at three points leaves the source VM running and
the target with nothing (no VM, no snapshot record, no chunk references)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from volt.snapshot import catalog, wire

from stellarium_core.errors import StellarError
from stellarium_core.host import Host

sys.path.insert(0, str(Path(__file__).parent))
from apiclient import VOLT, VoltProcess  # noqa: E402
from test_snapshot import COUNT_FOREVER_32, _manifest, needs_kvm  # noqa: E402
from tinyguest import make_elf  # noqa: E402

pytestmark = needs_kvm


def _host(tmp: Path, name: str) -> Path:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[store]\npath = "{name}-store"\n')
    from stellarium_core.cli import main as stellar

    assert stellar(["--config", str(cfg), "host", "init"]) == 0
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source(tmp: Path, cfg: Path, prefix: tuple[str, ...] = (), disk: str = "") -> VoltProcess:
    kernel = tmp / "count.elf"
    kernel.write_bytes(make_elf(body=COUNT_FOREVER_32, pvh=0x1000000))
    name = uuid.uuid4().hex[:6]
    src = VoltProcess(tmp / f"{name}.sock", "--landlock", "off", "--seccomp", "off",
                      console=tmp / f"{name}.out", volt_args=["--config", str(cfg)],
                      prefix=prefix)
    disks = [("/stellar/devices/disk", {"plugin": "virtio-stellar",
                                        "params": {"volume": disk}})] if disk else []
    for path, body in [("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
                       ("/boot-source", {"kernel_image_path": str(kernel)}), *disks,
                       ("/actions", {"action_type": "InstanceStart"})]:
        assert src.api.call("PUT", path, body) == (204, None), path
    assert _grows(src.output, 20)
    return src


def _grows(read, n: int = 1) -> bool:  # noqa: ANN001
    """True once ``read()`` has ``n`` more bytes than it had when called."""
    start, deadline = len(read()), time.monotonic() + 60
    while len(read()) < start + n and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(read()) >= start + n


def _target(cfg: Path, address: str, out: Path,
            prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """``volt run --incoming ADDRESS`` (confined, the default), console to ``out``."""
    with open(out, "wb") as f:
        proc = subprocess.Popen([*prefix, VOLT, "--config", str(cfg), "run", "--incoming",
                                 address], stdout=f, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    port = address.rsplit(":", 1)[1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        # listening (not connecting to check: it takes one connection only)
        r = subprocess.run([*prefix, "ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                           text=True)
        if r.stdout.strip():
            break
        time.sleep(0.1)
    return proc


@pytest.fixture
def netns() -> Iterator[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Two network namespaces joined by a veth pair, 10.77.0.1 and 10.77.0.2 (pyroute2)."""
    pyroute2 = pytest.importorskip("pyroute2")
    tag = uuid.uuid4().hex[:6]
    names = (f"volt-a-{tag}", f"volt-b-{tag}")
    try:
        for n in names:
            pyroute2.netns.create(n)
    except OSError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        with pyroute2.IPRoute() as ip:
            ip.link("add", ifname=f"va{tag}", kind="veth", peer=f"vb{tag}")
            for n, dev in zip(names, (f"va{tag}", f"vb{tag}"), strict=True):
                ip.link("set", index=ip.link_lookup(ifname=dev)[0], net_ns_fd=n)
        for i, (n, dev) in enumerate(zip(names, (f"va{tag}", f"vb{tag}"), strict=True)):
            with pyroute2.NetNS(n) as ns:
                idx = ns.link_lookup(ifname=dev)[0]
                ns.addr("add", index=idx, address=f"10.77.0.{i + 1}", prefixlen=24)
                ns.link("set", index=idx, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield tuple(("ip", "netns", "exec", n) for n in names)  # type: ignore[misc]
    finally:
        for n in names:
            pyroute2.netns.remove(n)


def test_a_counting_guest_migrates_between_namespaces_and_counts_on(tmp_path, netns):
    in_a, in_b = netns
    src = _source(tmp_path, _host(tmp_path, "a"), prefix=in_a)
    target_cfg = _host(tmp_path, "b")
    out = tmp_path / "target.out"
    tgt = _target(target_cfg, "10.77.0.2:7000", out, prefix=in_b)
    try:
        status, sent = src.api.call("PUT", "/stellar/migrate", {"to": "10.77.0.2:7000"})
        assert status == 200, sent
        print("migration:", sent)
        last = src.output()[-1]
        code, err = src.stop()
        assert code == 0 and "migrated to 10.77.0.2:7000" in err, err
        assert _grows(out.read_bytes, 5), tgt.stderr
        assert out.read_bytes()[0] in (last, (last + 1) & 0xFF)   # it counts on
        # a fresh target lacks everything: what was sent is the memory that is not zero
        assert 0 < sent["chunks_sent"] <= sent["chunks_offered"]
        assert sent["sent_bytes"] < sent["memory_bytes"] // 4, sent
        host = Host.from_config(target_cfg)
        assert catalog.names(host) == [f"migrated.volt-{tgt.pid}"]
    finally:
        if src.proc.poll() is None:       # a failed migration leaves it running
            src.stop()
        tgt.terminate()
        tgt.wait(60)


def test_a_target_that_holds_the_snapshot_already_is_sent_only_what_changed(tmp_path):
    cfg = _host(tmp_path, "a")
    src = _source(tmp_path, cfg)
    tgt = None
    try:
        a = src.api
        assert a.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
        assert a.call("PUT", "/snapshot/create", {"snapshot_path": "base"}) == (204, None)
        assert a.call("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
        address = f"127.0.0.1:{_free_port()}"
        tgt = _target(cfg, address, tmp_path / "t.out")     # the same store: it has "base"
        status, sent = a.call("PUT", "/stellar/migrate", {"to": address})
        assert status == 200, sent
        print("migration:", sent)
        base = catalog.load(Host.from_config(cfg), "base").manifest
        assert sent["chunks_sent"] < len(base.pieces), sent     # only the changed cells
        assert _grows((tmp_path / "t.out").read_bytes, 5)
    finally:
        src.stop()
        if tgt is not None:
            tgt.terminate()
            tgt.wait(60)


class CuttingRelay:
    """Forwards one source-target connection frame by frame and cuts both ends when the
    frame ``cut_at`` (a wire type) passes for the ``nth`` time, before forwarding it."""

    def __init__(self, target: str, cut_at: int, nth: int = 1) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.target, self.cut_at, self.nth = target, cut_at, nth
        self.cut = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.srv.accept()
        host, port = self.target.rsplit(":", 1)
        b = socket.create_connection((host, int(port)))
        seen = {"n": 0}

        def pump(src: socket.socket, dst: socket.socket) -> None:
            w = wire.Wire(src)
            try:
                while not self.cut.is_set():
                    head = w._exactly(wire.HEAD.size, "head")
                    kind, length = wire.HEAD.unpack(head)
                    body = w._exactly(length, "body")
                    if kind == self.cut_at:
                        seen["n"] += 1
                        if seen["n"] >= self.nth:
                            self.cut.set()
                            break
                    dst.sendall(head + body)
            except (wire.MigrationError, OSError):
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        t = threading.Thread(target=pump, args=(b, a), daemon=True)
        t.start()
        pump(a, b)
        t.join(10)


@pytest.mark.parametrize("cut_at, nth", [(wire.WANT, 1), (wire.CHUNK, 3),
                                         (wire.MANIFEST, 1)],
                         ids=["before-the-answer", "mid-transfer", "at-the-manifest"])
def test_a_cut_link_leaves_the_source_running_and_the_target_clean(tmp_path, cut_at, nth):
    src = _source(tmp_path, _host(tmp_path, "a"))
    target_cfg = _host(tmp_path, "b")
    address = f"127.0.0.1:{_free_port()}"
    tgt = _target(target_cfg, address, tmp_path / "t.out")
    relay = CuttingRelay(address, cut_at, nth)
    try:
        status, fault = src.api.call("PUT", "/stellar/migrate", {"to": relay.address,
                                                                 "timeout_s": 10})
        assert relay.cut.is_set()
        assert status == 400 and "the VM runs on here" in fault["fault_message"], fault
        assert src.api.call("GET", "/")[1]["state"] == "Running"
        assert _grows(src.output, 5)                    # and it still counts
        code = tgt.wait(60)
        err = tgt.stderr.read().decode(errors="replace")
        assert code == 16 and "incoming migration" in err, (code, err)
        host = Host.from_config(target_cfg)
        assert catalog.names(host) == []
        assert all(host.store.refs(d) == 0 for d in host.store.digests())
    finally:
        src.stop()
        if tgt.poll() is None:
            tgt.kill()


def test_a_disk_moves_with_the_vm_and_only_what_the_target_lacks_is_sent(tmp_path):
    """The source's volume is a 4 MiB ShareVol base (which the target holds already)
    and a 64 KiB delta: the disk costs the migration the delta, and the target's VM
    reads the source's disk."""
    from stellarium_core.volumes import tinyvol
    from stellarium_core.volumes.volume import VolumeStore

    src_cfg, tgt_cfg = _host(tmp_path, "a"), _host(tmp_path, "b")
    a, b = Host.from_config(src_cfg), Host.from_config(tgt_cfg)
    va, vb = VolumeStore.for_host(a), VolumeStore.for_host(b)
    with va.create("data", 4 << 20) as v:
        for i in range(64):
            v.write(i << 16, bytes([i + 1]) * (1 << 16))
    base = va.commit("data")
    with va.open("data") as v:
        v.write(0, b"written after the base" * 100)
    shared = va.load_base(base)
    for r in shared.manifest.refs.values():       # the target holds the base already
        b.store.put(a.store.get(r.digest))
    vb.import_base("seed", va._base_path(base).read_bytes())
    src = _source(tmp_path, src_cfg, disk="data")
    address = f"127.0.0.1:{_free_port()}"
    tgt = _target(tgt_cfg, address, tmp_path / "t.out")
    try:
        status, sent = src.api.call("PUT", "/stellar/migrate", {"to": address})
        assert status == 200, sent
        print("migration:", sent)
        assert sent["disk_bytes"] == 4 << 20
        assert sent["sent_bytes"] < (1 << 20), sent     # not the 4 MiB disk: its delta
        assert _grows((tmp_path / "t.out").read_bytes, 5)
        clone = f"migrated.volt-{tgt.pid}.disk.volt-{tgt.pid}"
        assert vb.exists(clone)
        with vb.open(f"migrated.volt-{tgt.pid}.disk", readonly=True) as v, \
                va.open("data", readonly=True) as w:
            assert v.read(0, 4 << 20) == w.read(0, 4 << 20)
        assert tinyvol.decode(vb.path(clone).read_bytes()).base == base
    finally:
        src.stop()
        tgt.terminate()
        tgt.wait(60)


def _hostile(frames) -> bytes:  # noqa: ANN001
    return b"".join(wire.HEAD.pack(k, len(p)) + p for k, p in frames)


PAGE_OF_ONES = b"\x01" * 4096
OFFER_7 = (wire.OFFER, wire.offer(wire.RAM, [b"\x07" * 32]))


@pytest.mark.parametrize("frames, says", [
    ([OFFER_7, (wire.CHUNK, b"\x07" * 32 + PAGE_OF_ONES)], "does not match its digest"),
    ([OFFER_7, (wire.CHUNK, b"\x08" * 32 + PAGE_OF_ONES)], "not asked for"),
    ([(99, b"")], "unknown type 99"),
    ([(wire.MANIFEST, b"{")], "not JSON"),
    ([(wire.OFFER, b"\x01" + b"\x00" * 31)], "whole 32-byte digests"),
    ([(wire.VOLUME, b"[]")], "VOLUME must be"),
], ids=["corrupt-chunk", "unasked-chunk", "unknown-frame", "bad-manifest", "torn-offer",
        "bad-volume"])
def test_a_hostile_source_is_refused_and_the_target_keeps_nothing(tmp_path, frames, says):
    from volt.snapshot.migrate import receive

    host = Host.from_config(_host(tmp_path, "b"))
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.sendall(_hostile(frames))
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(StellarError, match=says):     # a MigrationError or SnapshotError
        receive(host, ours, "evil")
    assert catalog.names(host) == []
    assert all(host.store.refs(d) == 0 for d in host.store.digests())
    theirs.settimeout(5)
    answers = theirs.recv(1 << 16)            # what the target told the source
    assert wire.HEAD.pack(wire.FAIL, 0)[:1] in answers


def test_a_frame_larger_than_its_type_allows_is_refused_before_it_is_read(tmp_path):
    from volt.snapshot.migrate import receive

    host = Host.from_config(_host(tmp_path, "b"))
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.sendall(wire.HEAD.pack(wire.MANIFEST, 1 << 31))
    with pytest.raises(wire.MigrationError, match="MANIFEST of 2147483648 bytes"):
        receive(host, ours, "evil")


def test_a_volume_frame_naming_a_path_outside_the_store_is_refused(tmp_path):
    from volt.snapshot.migrate import receive

    from stellarium_core.volumes import tinyvol

    host = Host.from_config(_host(tmp_path, "b"))
    vol = tinyvol.encode(tinyvol.TinyVol(size=1 << 20)).hex()
    frame = json.dumps({"device": "../../../tmp/evil", "volume": vol, "base": ""}).encode()
    manifest = _manifest(config={"devices": [{"id": "../../../tmp/evil",
                                              "params": {"volume": "x"}}]}).encode()
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    theirs.sendall(_hostile([(wire.VOLUME, frame), (wire.MANIFEST, manifest)]))
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(StellarError, match="bad volume name"):
        receive(host, ours, "evil")
    assert not (tmp_path / "evil.tinyvol").exists() and not Path("/tmp/evil.tinyvol").exists()
    assert catalog.names(host) == []
