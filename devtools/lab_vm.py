"""Runs inside the lab (L1): one VMM with a guest, and the host side of what the guest
does, driven by the guest's console markers as they arrive (timestamped by L1's clock).

``python lab_vm.py SCENARIO JSON-ARGS`` prints one JSON object: the console lines with
their L1 times, the VMM's exit code and stderr tail, and what the host side saw. It
never imports Volt: it runs the ``volt`` (or ``qemu-system-x86_64``) command line it
is given, so it serves device tests and benchmarks alike.

Scenarios (the host half of each lab test):

- ``plain``: just run the VM;
- ``net``: a DHCP server (busybox udhcpd) and an HTTP server on the tap once it exists;
- ``vsock``: connect to the guest through Firecracker's ``CONNECT``/``OK`` handshake and
  echo, and answer the guest's connection on ``<uds_path>_<port>``;
- ``balloon``: the VMM's RSS at the guest's ``BALLOON-*`` markers.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[str, subprocess.Popen], None]


def run_vm(argv: list[str], timeout: float, on_line: Handler | None = None,
           stdin: int | None = subprocess.DEVNULL,
           on_start: Callable[[subprocess.Popen], None] | None = None) -> dict:
    """Run a VMM; each console line with the L1 time it arrived; ``on_line`` sees each,
    ``on_start`` the process as soon as it exists (a profiler attaches there)."""
    err = open(f"/tmp/vmm-stderr-{os.getpid()}", "w+b")   # a file: a chatty VMM never blocks
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=stdin)
    if on_start is not None:
        on_start(proc)
    lines: list[tuple[float, str]] = []
    buf = b""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            lines.append((time.monotonic(), "LAB-VM-TIMEOUT"))
            break
        r, _, _ = select.select([fd], [], [], min(left, 1))
        if not r:
            continue
        chunk = os.read(fd, 65536)
        now = time.monotonic()
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.split(b"\n")
        for ln in done:
            text = ln.decode(errors="replace").rstrip("\r")
            lines.append((now, text))
            if on_line is not None:
                on_line(text, proc)
    rc = proc.wait(timeout=60)
    err.seek(0)
    tail = err.read().decode(errors="replace")[-3000:]
    err.close()
    return {"lines": lines, "exit": rc, "stderr": tail}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def read_line(sock: socket.socket) -> str:
    """Bytes up to and including the next newline (or EOF), as text."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace")


def wait_for(path: str, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


# -- scenarios -----------------------------------------------------------------------------

def net(args: dict) -> dict:
    """udhcpd + an HTTP server on the tap the VMM creates; the guest does the rest."""
    tap, host_ip, www = args["tap"], args["host_ip"], args["www"]
    conf = Path(f"/tmp/udhcpd-{tap}.conf")
    lease_ip = args["guest_ip"]
    conf.write_text(f"interface {tap}\nstart {lease_ip}\nend {lease_ip}\nmax_leases 1\n"
                    f"lease_file /tmp/udhcpd-{tap}.leases\noption subnet 255.255.255.0\n"
                    f"option router {host_ip}\n")
    Path(f"/tmp/udhcpd-{tap}.leases").touch()
    servers: list[subprocess.Popen] = []
    seen: dict = {}

    def start_servers() -> None:
        if not wait_for(f"/sys/class/net/{tap}", 120):
            seen["error"] = f"tap {tap} never appeared"
            return
        for _ in range(100):                          # the address comes right after
            out = subprocess.run(["busybox", "ip", "-4", "addr", "show", tap],
                                 capture_output=True, text=True).stdout
            if host_ip in out:
                break
            time.sleep(0.1)
        servers.append(subprocess.Popen(["busybox", "udhcpd", "-f", str(conf)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "http.server", str(args["port"]), "--bind", host_ip,
             "--directory", www], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        seen["servers_up"] = time.monotonic()

    t = threading.Thread(target=start_servers, daemon=True)
    t.start()
    try:
        res = run_vm(args["argv"], args.get("timeout", 240))
    finally:
        for s in servers:
            s.kill()
            s.wait()
    return {**res, **seen}


def vsock(args: dict) -> dict:
    """Host side of both directions: echo the guest's connection on uds_path_PORT, and
    connect to the guest's listener through CONNECT/OK once it says it listens."""
    uds, guest_port, host_port = args["uds_path"], args["guest_port"], args["host_port"]
    seen: dict = {}
    Path(uds).parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{uds}_{host_port}")
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.settimeout(60)
        seen["host_got"] = read_line(conn)
        conn.sendall(seen["host_got"].encode())
        conn.close()

    def connect_to_guest(text: str, _proc: subprocess.Popen) -> None:
        if not text.startswith(f"VSOCK-LISTENING {guest_port}"):
            return
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(60)
                s.connect(uds)
                s.sendall(f"CONNECT {guest_port}\n".encode())
                seen["handshake"] = read_line(s)
                s.sendall(b"hello-from-host\n")
                seen["echo"] = read_line(s)
        except OSError as exc:           # the result still carries the VMM's stderr
            seen["host_error"] = f"{type(exc).__name__}: {exc}"

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    res = run_vm(args["argv"], args.get("timeout", 240), connect_to_guest)
    server.close()
    return {**res, **seen}


def balloon(args: dict) -> dict:
    """The VMM's RSS (KiB) when the guest prints each ``BALLOON-*`` marker."""
    rss: dict[str, int] = {}

    def sample(text: str, proc: subprocess.Popen) -> None:
        if text.startswith("BALLOON-"):
            rss[text.split()[0]] = rss_kib(proc.pid)
    res = run_vm(args["argv"], args.get("timeout", 300), sample)
    return {**res, "rss_kib": rss}


def plain(args: dict) -> dict:
    return run_vm(args["argv"], args.get("timeout", 240))


SCENARIOS = {"net": net, "vsock": vsock, "balloon": balloon, "plain": plain}


def main() -> int:
    name, raw = sys.argv[1], sys.argv[2]
    print(json.dumps(SCENARIOS[name](json.loads(raw))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
