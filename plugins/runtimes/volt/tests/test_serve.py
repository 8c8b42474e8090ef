"""``volt serve`` + ``volt spawn``: one pre-imported server, a forked and confined VM per
request, each with its client's stdio and exit code; bad requests are refused and the
server goes on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from volt.vmm import exitcodes

sys.path.insert(0, str(Path(__file__).parent))
from test_jail_confine import HELLO, needs_kvm  # noqa: E402
from tinyguest import make_elf  # noqa: E402

VOLT = str(Path(sys.executable).with_name("volt"))
WAIT = 60.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Path]:
    sock = tmp_path / "volt.sock"
    proc = subprocess.Popen([VOLT, "serve", str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + WAIT
    while not sock.is_socket():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    yield sock
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err
    assert not sock.exists()


def spawn(sock: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VOLT, "spawn", str(sock), "--", *args], capture_output=True,
                          text=True, timeout=WAIT)


@needs_kvm
def test_each_request_is_a_confined_vm_with_the_clients_console(server, tmp_path):
    k = tmp_path / "hello.elf"
    k.write_bytes(make_elf(body=HELLO, pvh=0x1000000))
    assert oct(server.stat().st_mode & 0o777) == "0o600"
    for _ in range(2):                                  # the server outlives its VMs
        res = spawn(server, "--kernel", str(k), "--mem", "32", "--timing")
        assert res.returncode == 0, res.stderr
        assert res.stdout.replace("\r", "") == "Hi\n"
        assert "volt: confined: landlock ABI" in res.stderr and "seccomp kill" in res.stderr
        # the child's clock starts at the fork: no interpreter, no module imports
        assert "interpreter 0.0" in res.stderr, res.stderr


@needs_kvm
def test_a_vm_holds_nothing_of_the_server(server, tmp_path):
    """Not the listening socket, not another client's connection (the server keeps each
    running VM's, to send its exit code): a compromised VM cannot take requests meant for
    the server or answer for another VM."""
    k = tmp_path / "spin.elf"
    k.write_bytes(make_elf(body=bytes.fromhex("ebfe"), pvh=0x1000000))     # jmp $
    argv = ["--kernel", str(k), "--mem", "32", "--serial", "none"]
    null = os.open(os.devnull, os.O_RDWR)
    clients, pids = [], []
    try:
        for _ in range(2):                   # the first VM's connection is open meanwhile
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(c)
            c.connect(str(server))
            socket.send_fds(c, [json.dumps({"argv": argv}).encode()], [null, null, null])
            pids.append(json.loads(c.makefile("rb").readline())["pid"])
        time.sleep(1)                        # built and running by now
        fds = f"/proc/{pids[1]}/fd"
        links = [os.readlink(f"{fds}/{f}") for f in os.listdir(fds)]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for c in clients:
            c.close()
        os.close(null)
    assert "/dev/kvm" in links
    assert not [link for link in links if link.startswith("socket:")], links


def test_a_silent_client_does_not_hold_up_the_others(server):
    """Requests are taken one at a time: one that never comes is given up on, with an
    answer saying so, and the next client is served."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(server))
        res = spawn(server, "--no-such-flag")
        assert json.loads(silent.makefile("rb").readline()) == \
            {"error": "no request within 5 s of connecting"}
    assert res.returncode == 2, res.stderr           # served: argparse answered


@needs_kvm
def test_a_vm_error_is_its_exit_code_and_the_server_goes_on(server, tmp_path):
    res = spawn(server, "--kernel", str(tmp_path / "missing"), "--mem", "32")
    assert res.returncode == exitcodes.KERNEL and "missing" in res.stderr, res
    assert spawn(server, "--no-such-flag").returncode == 2


def test_malformed_requests_are_refused_one_line_each(server):
    def ask(payload: bytes, fds: list[int]) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(server))
            socket.send_fds(c, [payload], fds)
            return json.loads(c.makefile("rb").readline())

    null = os.open(os.devnull, os.O_RDWR)
    try:
        assert "3 file descriptors" in ask(b'{"argv": []}', [null])["error"]
        assert "argv" in ask(b'{"argv": "x"}', [null, null, null])["error"]
        assert "error" in ask(b"not json", [null, null, null])
    finally:
        os.close(null)


def test_spawn_without_a_server_is_a_clear_error(tmp_path):
    res = spawn(tmp_path / "nobody.sock", "--kernel", "k")
    assert res.returncode == 1 and "no volt serve at" in res.stderr
