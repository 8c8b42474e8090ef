"""Runs inside the lab: time VMM process start -> init marker on the console, N times each.

Prints one JSON object on stdout: {"volt": [seconds...], "volt-vmm": [...],
"volt-unconfined": [...], "qemu": [...], "errors": [...]}. ``volt`` is the full CLI
(``volt run``, confined by default), ``volt-vmm`` the lean VMM entry (``python -m volt.vmm``),
``volt-unconfined`` the CLI with ``--landlock=off --seccomp=off`` (the cost of confinement),
``qemu`` the peer.
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
    out: dict[str, list] = {name: [] for name in runs}
    out["errors"] = []
    for _ in range(n):           # interleaved, so background load hits both alike
        for name, argv in runs.items():
            try:
                out[name].append(time_to_marker(argv, 120))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                out["errors"].append(f"{name}: {exc}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
