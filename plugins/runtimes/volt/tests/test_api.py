"""Firecracker's REST API on a real ``volt run --api-sock`` process, confined as by default.

The guest is a few bytes of 32-bit PVH code that prints "R" and then echoes every byte
it reads from the i8042 keyboard to COM1, so SendCtrlAltDel is seen arriving as scan
codes. Bad input (the issue's list) gets a 400 with a fault message and the VM goes on;
a hypothesis run sends 2,000 random requests to the confined API thread, where any
syscall outside its allowlist would kill the process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from volt.api.http import MAX_BODY

sys.path.insert(0, str(Path(__file__).parent))
from apiclient import Api, VoltProcess  # noqa: E402
from tinyguest import kvm_unusable, make_elf  # noqa: E402

needs_kvm = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))

#: mov dx,0x3f8; mov al,'R'; out dx,al
#: poll: mov ecx,20000; d: dec ecx; jnz d; in al,0x64; test al,1; jz poll
#:       in al,0x60; out dx,al; jmp poll
KEYBOARD_ECHO = bytes.fromhex("66baf803" "b052" "ee" "b9204e0000" "49" "75fd" "e464" "a801"
                              "74f2" "e460" "ee" "ebed")
SET2_CTRL_ALT_DEL = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])
AFTER = "The requested operation is not supported after starting the microVM."
BEFORE = "The requested operation is not supported before starting the microVM."


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "echo.elf"
    k.write_bytes(make_elf(body=KEYBOARD_ECHO, pvh=0x1000000))
    return k


@pytest.fixture
def vm(tmp_path: Path):
    v = VoltProcess(tmp_path / "api.sock", console=tmp_path / "console")
    yield v
    v.stop()


def raw(sock: str, data: bytes, *, shut: bool = False, timeout: float = 10.0) -> bytes:
    """Send raw bytes (optionally half-closing), return everything the server answers."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


def req(method: str, path: str, body: bytes) -> bytes:
    return b"%s %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
        method.encode(), path.encode(), len(body), body)


def fault_of(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["fault_message"]


def test_preboot_configuration_and_its_errors(vm: VoltProcess, kernel: Path,
                                              tmp_path: Path) -> None:
    a = vm.api
    status, info = a.call("GET", "/")
    assert status == 200 and info["state"] == "Not started" and info["app_name"] == "Volt"
    assert a.call("GET", "/version") == (200, {"firecracker_version": "1.16.1"})
    assert a.call("GET", "/machine-config")[1]["mem_size_mib"] == 128
    assert a.call("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64}) == (204, None)
    assert a.call("PATCH", "/machine-config", {"mem_size_mib": 32}) == (204, None)
    assert a.call("GET", "/machine-config") == (200, {
        "vcpu_count": 2, "mem_size_mib": 32, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None"})
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 65536)
    assert a.call("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(disk),
                                            "is_root_device": True,
                                            "is_read_only": True}) == (204, None)
    assert a.call("PUT", "/boot-source", {"kernel_image_path": str(kernel),
                                          "boot_args": "console=ttyS0"}) == (204, None)
    full = a.call("GET", "/vm/config")[1]
    assert full["drives"][0]["path_on_host"] == str(disk) and full["drives"][0]["is_root_device"]
    assert full["boot-source"]["kernel_image_path"] == str(kernel)
    for path, body, missing in [
        ("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}, "virtio-net"),
        ("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v")}, "virtio-vsock"),
        ("/entropy", {}, "virtio-rng"),
        ("/balloon", {"amount_mib": 1, "deflate_on_oom": False}, "virtio-balloon"),
    ]:
        from stellarium_core.plugins import installed

        if any(p.name == missing for p in installed("device")):
            continue
        status, body = a.call("PUT", path, body)
        assert status == 400 and f"no device plugin named '{missing}' is installed" in \
            body["fault_message"], body
    assert a.call("GET", "/balloon") == (400, {"fault_message": "No balloon device configured."})
    assert a.call("PUT", "/metrics", {"metrics_path": str(tmp_path / "m")}) == (204, None)
    assert a.call("PUT", "/metrics", {"metrics_path": str(tmp_path / "m")})[1] == {
        "fault_message": "Reinitialization of metrics not allowed."}
    for method, path, body, message in [
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, BEFORE),
        ("PATCH", "/vm", {"state": "Paused"}, BEFORE),
        ("PATCH", "/drives/rootfs", {"drive_id": "rootfs"}, BEFORE),
        ("PUT", "/drives/other", {"drive_id": "rootfs", "path_on_host": "x",
                                  "is_root_device": False, "is_read_only": True},
         "The id from the path does not match the id from the body!"),
        ("PUT", "/drives/a-b", {"drive_id": "a-b", "path_on_host": "x",
                                "is_root_device": False, "is_read_only": True},
         "API Resource IDs can only contain alphanumeric characters and underscores"),
        ("PUT", "/stellar/devices/x", {"plugin": "nope"}, "no device plugin named 'nope'"),
        ("GET", "/nowhere", None, "Invalid request method and/or path: GET /nowhere."),
        ("DELETE", "/drives/rootfs", None, "Invalid request method and/or path"),
    ]:
        status, got = a.call(method, path, body)
        assert status == 400 and message in got["fault_message"], (path, got)


@needs_kvm
def test_instance_start_moves_the_api_to_a_confined_thread_and_controls_the_vm(
        vm: VoltProcess, kernel: Path, tmp_path: Path) -> None:
    a = vm.api
    assert a.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (400, {
        "fault_message": "Cannot start microvm without kernel configuration."})
    assert list(vm.threads()) == ["volt"]             # before the start: one thread, unconfined
    metrics, log = tmp_path / "metrics.json", tmp_path / "vmm.log"
    for path, body in [("/logger", {"log_path": str(log), "level": "Info", "show_level": True}),
                       ("/metrics", {"metrics_path": str(metrics)}),
                       ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
                       ("/boot-source", {"kernel_image_path": str(kernel)}),
                       ("/actions", {"action_type": "InstanceStart"})]:
        assert a.call("PUT", path, body) == (204, None), path
    assert vm.wait_output(b"R")
    # The API moves to its thread just after the vCPUs start: the guest may print first,
    # and the thread has its name a moment before it has confined itself.
    deadline = time.monotonic() + 5
    while (threads := vm.threads()).get("api", {}).get("Seccomp_filters") != "2" \
            and time.monotonic() < deadline:
        time.sleep(0.001)
    assert threads["api"] == {"NoNewPrivs": "1", "Seccomp_filters": "2",
                              "CapEff": "0000000000000000"}
    assert threads["vcpu0"]["Seccomp_filters"] == threads["io"]["Seccomp_filters"] == "2"
    assert a.call("GET", "/")[1]["state"] == "Running"
    assert a.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert a.call("GET", "/")[1]["state"] == "Paused"
    assert a.call("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert a.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert vm.wait_output(b"R" + SET2_CTRL_ALT_DEL), vm.output()
    assert a.call("PUT", "/boot-source", {"kernel_image_path": "x"})[1] == {
        "fault_message": AFTER}
    assert a.call("PUT", "/actions", {"action_type": "InstanceStart"})[1] == {
        "fault_message": AFTER}
    assert a.call("PUT", "/actions", {"action_type": "FlushMetrics"}) == (204, None)
    line = json.loads(metrics.read_text().splitlines()[-1])
    boot = line["boot"]
    assert boot["api_socket_accepting_ms"] <= boot["start_requested_ms"] <= boot["built_ms"] \
        <= boot["confined_ms"] <= boot["first_kvm_run_ms"]
    assert line["vcpu"]["exits_io"] > 0 and line["i8042"]["ctrl_alt_del"] == 1
    assert line["put_api_requests"]["actions_count"] == 4      # this flush counts after it
    assert line["put_api_requests"]["actions_fails"] == 2
    status, current = a.call("GET", "/stellar/metrics")
    assert status == 200 and current["state"] == "Running"
    code, err = vm.stop()
    assert code == 143, err
    assert "seccomp kill" in err and "SIGTERM" in err
    lines = metrics.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["state"] == "Running"  # the last line
    text = log.read_text()
    assert ":api:INFO] API PATCH /vm: 204" in text and ":api:WARN] API PUT /boot-source: 400" \
        in text


@needs_kvm
def test_config_file_boots_at_once_and_no_api_needs_one(tmp_path: Path, kernel: Path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": str(kernel)},
                               "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}))
    v = VoltProcess(tmp_path / "api.sock", "--config-file", str(cfg),
                    console=tmp_path / "console")
    try:
        assert v.wait_output(b"R")
        assert v.api.call("GET", "/")[1]["state"] == "Running"
    finally:
        v.stop()
    import subprocess

    from apiclient import VOLT

    r = subprocess.run([VOLT, "run", "--no-api"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--no-api needs --config-file" in r.stderr


def test_bad_input_is_a_400_and_the_server_goes_on(vm: VoltProcess) -> None:
    s = vm.sock
    big = b"PUT /boot-source HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    cases = [
        (req("PUT", "/boot-source", b"{bad}"),
         "An error occurred when deserializing the json body of a request"),
        (req("PUT", "/boot-source", b"\xff\xfe{}"),
         "An error occurred when deserializing the json body of a request"),
        (req("PUT", "/machine-config", b'{"vcpu_count": "1", "mem_size_mib": 64}'),
         "vcpu_count: expected an integer"),
        (req("PUT", "/boot-source", b'{"kernel_image_path": "k", "extra": 1}'),
         "extra: unknown key"),
        (req("PUT", "/boot-source", b"[]"), "expected an object"),
        (req("PUT", "/actions", b'{"action_type": "Reboot"}'),
         "action_type: must be one of FlushMetrics, InstanceStart, SendCtrlAltDel"),
        (big, f"is larger than the limit of {MAX_BODY} allowed by server"),
        (b"PUT /boot-source HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
         "Transfer-Encoding is not supported"),
        (b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", "GET request cannot have a body."),
        (b"PUT /boot-source HTTP/1.1\r\n\r\n", "Empty PUT request."),
        (b"BREW / HTTP/1.1\r\n\r\n", "unsupported HTTP method"),
        (b"GET /\r\n\r\n", "malformed request line"),
        (b"GET / HTTP/1.1\r\nX" + b"x" * 9000 + b": y\r\n\r\n", "request head larger than"),
        (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "malformed header line"),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
    ]
    for request, message in cases:
        answer = raw(s, request, shut=True)
        assert answer, request[:60]
        status, got = fault_of(answer)
        assert status == 400 and message in got, (request[:60], got)
    # A client that stops mid-request and half-closes still hears why.
    status, got = fault_of(raw(s, b'PUT /boot-source HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"ke',
                               shut=True))
    assert status == 400 and "incomplete request" in got
    # One that vanishes (full close, even mid-body) costs nothing.
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(s)
        c.sendall(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 9000\r\n\r\n{")
    # curl's "Expect: 100-continue" gets its interim answer, then the real one.
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(s)
        c.sendall(b"PUT /logger HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 100 Continue")
        c.sendall(b"{}")
        assert c.recv(1000).startswith(b"HTTP/1.1 204")
    # Pipelined requests on one connection are answered in order.
    two = raw(s, b"GET /version HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert two.count(b"HTTP/1.1 200 OK") == 2 and two.index(b"firecracker_version") < \
        two.index(b"app_name")
    assert Api(s).call("GET", "/")[0] == 200
    assert vm.proc.poll() is None


REQUEST_PATHS = ["/", "/version", "/machine-config", "/boot-source", "/drives/root",
                 "/drives/a-b", "/network-interfaces/eth0", "/vsock", "/entropy", "/balloon",
                 "/balloon/statistics", "/logger", "/metrics", "/actions", "/vm", "/vm/config",
                 "/stellar/devices/x", "/stellar/metrics", "/snapshot/create", "/%00", "//"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kernel_image_path", "action_type", "state", "vcpu_count",
                         "mem_size_mib", "drive_id", "path_on_host", "is_root_device",
                         "is_read_only", "metrics_path", "amount_mib", "plugin", "params",
                         "level", "x"]) | st.text(max_size=8), inner, max_size=5),
    max_leaves=12)
bodies = (json_values.map(lambda v: json.dumps(v).encode())
          | st.sampled_from([b'{"action_type": "SendCtrlAltDel"}', b'{"state": "Paused"}',
                             b'{"state": "Resumed"}', b'{"action_type": "FlushMetrics"}'])
          | st.binary(max_size=64))
requests = st.one_of(
    st.tuples(st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "POST"]),
              st.sampled_from(REQUEST_PATHS) | st.text(
                  st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(
                  lambda t: "/" + t),
              st.none() | bodies).map(
        lambda r: (f"{r[0]} {r[1]} HTTP/1.1\r\n".encode()
                   + (b"Content-Length: %d\r\n" % len(r[2]) if r[2] is not None else b"")
                   + b"\r\n" + (r[2] or b""))),
    st.binary(max_size=200).map(lambda b: b + b"\r\n\r\n"))


@needs_kvm
def test_two_thousand_random_requests_to_the_confined_api_thread(vm: VoltProcess,
                                                                kernel: Path) -> None:
    a = vm.api
    a.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
    a.call("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    assert a.call("PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    assert vm.wait_output(b"R")
    sent = []

    @settings(max_examples=2000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests)
    def one(request: bytes) -> None:
        sent.append(request)
        answer = raw(vm.sock, request, shut=True)
        head = answer.split(b"\r\n", 1)[0]
        assert head.startswith(b"HTTP/1.1 "), (request, answer[:200])
        status = int(head.split()[1])
        assert status in (200, 204, 400), (request, answer[:200])
        if status == 400:
            assert fault_of(answer)[1], answer

    started = time.monotonic()
    one()
    assert len(sent) >= 2000
    assert vm.proc.poll() is None, vm.stop()[1]
    a = Api(vm.sock)
    a.call("PATCH", "/vm", {"state": "Resumed"})
    assert a.call("GET", "/")[1]["state"] == "Running"
    print(f"{len(sent)} requests in {time.monotonic() - started:.1f} s")


@needs_kvm
def test_metrics_carry_a_stellar_drives_shared_chunks_read_by_the_confined_io_thread(
        tmp_path: Path, kernel: Path) -> None:
    """A drive ``stellar:volume/vm0`` cloned from ``base``: the metrics line, collected in
    the confined I/O thread (Landlock: the store read-only; seccomp: the io kind), says
    how many of its chunks the clone shares."""
    import subprocess

    from stellarium_core.plugins import installed

    if not any(p.name == "virtio-stellar" for p in installed("device")):
        pytest.skip("the virtio-stellar device plugin is not installed")
    host = tmp_path / "host.toml"
    host.write_text('[store]\npath = "store"\n')
    raw_disk = tmp_path / "disk.raw"
    raw_disk.write_bytes(bytes(range(256)) * 4096 * 2)        # 2 MiB
    for args in (["host", "init"], ["vol", "import", "base", str(raw_disk)],
                 ["vol", "clone", "base", "vm0"]):
        r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(host),
                            *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    metrics = tmp_path / "metrics.json"
    v = VoltProcess(tmp_path / "api.sock", console=tmp_path / "console",
                    volt_args=["--config", str(host)])
    try:
        a = v.api
        for path, body in [("/metrics", {"metrics_path": str(metrics)}),
                           ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
                           ("/boot-source", {"kernel_image_path": str(kernel)}),
                           ("/drives/vm0", {"drive_id": "vm0", "is_root_device": False,
                                            "is_read_only": True,
                                            "path_on_host": "stellar:volume/vm0"}),
                           ("/actions", {"action_type": "InstanceStart"}),
                           ("/actions", {"action_type": "FlushMetrics"})]:
            assert a.call("PUT", path, body) == (204, None), path
        line = json.loads(metrics.read_text().splitlines()[-1])
    finally:
        code, err = v.stop()
    assert "seccomp kill" in err and code == 143, err
    disk = line["devices"]["vm0"]
    assert disk["chunks"] == disk["shared_chunks"] > 0, disk
    assert line["volumes"] == {"chunks": disk["chunks"], "shared_chunks": disk["chunks"]}


def test_idle_work_runs_once_after_the_requests_already_waiting(tmp_path: Path) -> None:
    """What a pre-started VMM does while nobody asks anything (Instance.prepare) never
    delays a request that was already waiting, and runs once."""
    from volt.api.http import Response
    from volt.api.server import ApiServer, bind

    events: list[str] = []
    path = str(tmp_path / "api.sock")
    listener = bind(path)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        client.sendall(req("GET", "/machine-config", b""))
        server = ApiServer(listener, lambda r: events.append(r.path) or Response(200, {}))
        try:
            server.serve(until=lambda: events.count("idle") > 0, every=0.05,
                         idle=lambda: events.append("idle"))
            client.sendall(req("GET", "/", b""))
            server.serve(until=lambda: len(events) == 3, every=0.05)
        finally:
            server.close()
        assert events == ["/machine-config", "idle", "/"]
        assert client.recv(4096).startswith(b"HTTP/1.1 200")


def test_prepare_opens_an_initialised_store_and_leaves_anything_else_alone(
        tmp_path: Path) -> None:
    from volt.vmm.config import VmConfig
    from volt.vmm.instance import Instance

    from stellarium_core import config as config_mod
    from stellarium_core.host import Host, init_store

    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    absent = Host(config_mod.load(cfg))
    Instance(absent, VmConfig()).prepare()
    assert "store" not in vars(absent) and not (tmp_path / "store").exists()  # none made
    init_store(Host(config_mod.load(cfg)))
    meta = tmp_path / "store/nebula/nebula.json"
    good = meta.read_bytes()
    meta.write_bytes(b"not a store's description")
    damaged = Host(config_mod.load(cfg))
    Instance(damaged, VmConfig()).prepare()      # the request that needs it will say
    assert "store" not in vars(damaged)
    meta.write_bytes(good)
    ready = Host(config_mod.load(cfg))
    Instance(ready, VmConfig()).prepare()
    assert "store" in vars(ready)


PREPARED = """
import sys
from volt.vmm import preload
from volt.vmm.config import VmConfig
from volt.vmm.instance import Instance
from stellarium_core.host import Host
ahead = [m for m in preload.MODULES if m not in sys.modules]
Instance(Host.from_config(sys.argv[1]), VmConfig()).prepare()
print(len(ahead), [m for m in ahead if m not in sys.modules])
"""


def test_prepare_imports_what_a_vm_start_would(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    r = subprocess.run([sys.executable, "-c", PREPARED, str(cfg)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    count, left = r.stdout.split(maxsplit=1)
    assert int(count) > 5 and left.strip() == "[]"    # were not loaded, then were
