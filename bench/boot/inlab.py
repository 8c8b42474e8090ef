"""Runs inside the lab: time VMM process start -> init marker on the console, N times each.

With ``--manifest``, boots from a boot manifest with and without its prefetch set
instead (:func:`manifest_main`).

Prints one JSON object on stdout: {"volt": [seconds...], "volt-vmm": [...],
"volt-unconfined": [...], "volt-serve": [...], "qemu": [...], "errors": [...]}.
``volt`` is the full CLI (``volt run``, confined by default), ``volt-vmm`` the lean VMM
entry (``python -m volt.vmm``), ``volt-unconfined`` the CLI with ``--landlock=off
--seccomp=off`` (the cost of confinement), ``volt-serve`` a VM forked by a pre-started
``volt serve`` (request to marker), ``qemu`` the peer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARKER = b"VOLT-INIT-OK"
#: What the disk-reading init prints once it has read its payload from /dev/vda.
DISK_MARKER = b"BENCH-DISK-READ"
MANIFEST_CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"


def time_to_marker(argv: list[str], timeout: float) -> float:
    """Seconds from spawning ``argv`` until MARKER appears on its stdout; waits for exit."""
    return run_to_marker(argv, timeout, MARKER)[0]


def run_to_marker(argv: list[str], timeout: float, marker: bytes) -> tuple[float, bytes]:
    """(seconds from spawning ``argv`` until ``marker`` is on its stdout, its stderr)."""
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
        if marker in buf:
            seen = time.monotonic() - t0
    proc.stdout.read()
    err = proc.stderr.read()
    proc.wait(timeout=60)
    if seen is None:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode} without the marker: "
                           f"{buf[-300:]!r} {err[-300:]!r}")
    return seen, err


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


def prefetch_ms(stderr: bytes) -> float | None:
    """The ``prefetch`` phase of a ``volt run --timing`` setup line."""
    m = re.search(rb"volt: setup .*?\bprefetch ([\d.]+)", stderr)
    return float(m.group(1)) if m else None


def manifest_main(volt: str, cfg: str, disk: str, kernel: str, n: int) -> int:
    """Boot from a boot manifest, with and without its prefetch set, beside QEMU microvm
    reading the same ext4 disk through virtio-blk; every run starts with an empty hot tier
    and dropped page cache. Prints {"volt-manifest": [s...], "volt-manifest-prefetch":
    [s...], "qemu": [s...], "prefetch_ms": [...], "prefetch_chunks": N, "errors": [...]}."""
    from stellarium_core.boot import load
    from stellarium_core.host import Host
    from stellarium_core.photon.shm import hot_dir

    c = [volt, "--config", cfg]
    spec = ["--kernel", "guest", "--initrd", "guest", "--volume", "root", "--mem", "128",
            f"--cmdline={MANIFEST_CMDLINE}"]
    subprocess.run([*c, "boot", "record", "warm", *spec, "--trace-from-boot",
                    "--run-args=--serial none"], check=True, stdout=subprocess.DEVNULL,
                   timeout=600)
    subprocess.run([*c, "boot", "record", "cold", *spec], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    host = Host.from_config(cfg)
    hot = hot_dir(host.store_path, {})          # run.py's config names no other hot tier
    runs = {"volt-manifest": [*c, "run", "--boot", "cold", "--timing"],
            "volt-manifest-prefetch": [*c, "run", "--boot", "warm", "--timing"],
            # acpi=off: the minimal kernel finds virtio-mmio devices on its command line
            "qemu": ["qemu-system-x86_64", "-M",
                     "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off", "-enable-kvm",
                     "-cpu", "host", "-m", "128", "-nodefaults", "-no-user-config",
                     "-nographic", "-serial", "stdio", "-no-reboot", "-kernel", kernel,
                     "-initrd", str(Path(cfg).parent / "init.cpio"),
                     "-global", "virtio-mmio.force-legacy=false", "-drive",
                     f"file={disk},format=raw,if=none,id=d0,readonly=on", "-device",
                     "virtio-blk-device,drive=d0",
                     "-append", MANIFEST_CMDLINE.replace("reboot=k", "reboot=t")]}
    out: dict[str, Any] = {name: [] for name in runs}
    out.update(prefetch_ms=[], errors=[], prefetch_chunks=len(load(host, "warm").manifest.prefetch))
    for _ in range(n):
        for name, argv in runs.items():
            shutil.rmtree(hot, ignore_errors=True)        # every run starts cold
            with contextlib.suppress(OSError), open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            try:
                seconds, err = run_to_marker(argv, 300, DISK_MARKER)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                out["errors"].append(f"{name}: {exc}")
                continue
            out[name].append(seconds)
            if name == "volt-manifest-prefetch":
                out["prefetch_ms"].append(prefetch_ms(err))
    print(json.dumps(out))
    return 0


def main() -> int:
    if sys.argv[1] == "--manifest":
        return manifest_main(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5],
                             int(sys.argv[6]))
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
