"""Runs inside the lab: time VMM process start -> init marker on the console, N times each.

Prints one JSON object on stdout: {"volt": [seconds...], "volt-vmm": [...],
"volt-unconfined": [...], "volt-serve": [...], "qemu": [...], "errors": [...]}.
``volt`` is the full CLI (``volt run``, confined by default), ``volt-vmm`` the lean VMM
entry (``python -m volt.vmm``), ``volt-unconfined`` the CLI with ``--landlock=off
--seccomp=off`` (the cost of confinement), ``volt-serve`` a VM forked by a pre-started
``volt serve`` (request to marker), ``qemu`` the peer.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

MARKER = b"VOLT-INIT-OK"


def time_to_marker(argv: list[str], timeout: float) -> float:
    """Seconds from spawning ``argv`` until MARKER appears on its stdout; waits for exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    buf, seen = b"", None
    fd = proc.stdout.fileno()
    while seen is None:
        left = timeout - (time.monotonic() - t0)
        if left <= 0:
            proc.kill()
            raise RuntimeError(f"{argv[0]}: no marker after {timeout}s: {buf[-300:]!r}")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if MARKER in buf:
            seen = time.monotonic() - t0
    proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    if seen is None:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode} without the marker: "
                           f"{buf[-300:]!r} {err[-300:]!r}")
    return seen


def served_to_marker(sock: str, argv: list[str], timeout: float) -> float:
    """Seconds from a request to ``volt serve`` until MARKER is on the VM's stdout (the
    request is made here, so no client process start is counted); waits for its end."""
    import json
    import socket

    t0 = time.monotonic()
    rd, wr = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock)
        socket.send_fds(conn, [json.dumps({"argv": argv}).encode()], [null, wr, null])
        os.close(wr)
        buf, seen = b"", None
        while seen is None:
            left = timeout - (time.monotonic() - t0)
            r, _, _ = select.select([rd], [], [], max(left, 0))
            if not r:
                raise RuntimeError(f"volt serve: no marker after {timeout}s: {buf[-300:]!r}")
            chunk = os.read(rd, 65536)
            if not chunk:
                raise RuntimeError(f"volt serve: the VM ended without the marker: "
                                   f"{buf[-300:]!r}")
            buf += chunk
            if MARKER in buf:
                seen = time.monotonic() - t0
        while os.read(rd, 65536):
            pass
        conn.settimeout(60)
        conn.makefile("rb").read()            # {"pid"}, then {"exit"} once it ended
        return seen
    finally:
        conn.close()
        os.close(rd)
        os.close(null)


def start_server(volt: str) -> tuple[subprocess.Popen, str]:
    """A ``volt serve`` in this lab (pre-imported before any timed run)."""
    sock = "/run/volt-serve.sock"
    server = subprocess.Popen([volt, "serve", sock], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not os.path.exists(sock):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("volt serve did not start")
        time.sleep(0.1)
    return server, sock


def main() -> int:
    volt, kernel, initrd, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cmdline = "console=ttyS0 reboot=k panic=-1 quiet"
    args = ["--kernel", kernel, "--initrd", initrd, "--mem", "128", "--cmdline", cmdline]
    runs = {
        "volt": [volt, "run", *args],
        "volt-vmm": [sys.executable, "-m", "volt.vmm", *args],
        "volt-unconfined": [volt, "run", *args, "--landlock=off", "--seccomp=off"],
        "qemu": ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
                 "-enable-kvm", "-cpu", "host", "-m", "128", "-nodefaults", "-no-user-config",
                 "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", kernel,
                 "-initrd", initrd, "-append", cmdline.replace("reboot=k", "reboot=t")],
    }
    server, sock = start_server(volt)
    out: dict[str, list] = {name: [] for name in [*runs, "volt-serve"]}
    out["errors"] = []
    for _ in range(n):           # interleaved, so background load hits both alike
        for name, argv in runs.items():
            try:
                out[name].append(time_to_marker(argv, 120))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                out["errors"].append(f"{name}: {exc}")
        try:
            out["volt-serve"].append(served_to_marker(sock, args, 120))
        except (RuntimeError, OSError) as exc:
            out["errors"].append(f"volt-serve: {exc}")
    server.terminate()
    server.wait(timeout=60)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
