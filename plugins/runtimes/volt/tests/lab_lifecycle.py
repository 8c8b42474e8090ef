"""Run inside the lab by test_vmm_lab.py: poweroff, pause/resume and SIGTERM on real Linux.

Usage: python lab_lifecycle.py VOLT KERNEL POWEROFF_INITRD TICKER_INITRD
Prints one JSON object with what it observed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time


def read_until(proc: subprocess.Popen, needle: bytes, timeout: float, buf: bytearray) -> bool:
    end = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                return needle in buf
            buf += chunk
    return True


def drain(proc: subprocess.Popen, buf: bytearray, seconds: float) -> None:
    read_until(proc, b"\0never\0", seconds, buf)


def main() -> int:
    volt, kernel, poweroff_initrd, ticker_initrd = sys.argv[1:5]
    base = [volt, "run", "--kernel", kernel, "--mem", "128",
            "--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"]
    out: dict[str, object] = {}

    try:
        p = subprocess.run([*base, "--initrd", poweroff_initrd], capture_output=True,
                           timeout=300)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:       # say so in the JSON, with what it printed
        rc, stdout, stderr = None, exc.stdout or b"", exc.stderr or b""
        out["poweroff_console"] = stdout.decode(errors="replace")[-1500:]
    out["poweroff_rc"] = rc
    out["poweroff_marker"] = b"VOLT-POWEROFF" in stdout
    out["poweroff_stderr"] = stderr.decode(errors="replace")[-300:]

    proc = subprocess.Popen([*base, "--initrd", ticker_initrd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    buf = bytearray()
    out["ticking"] = read_until(proc, b"tick 2", 300, buf)
    proc.send_signal(signal.SIGUSR1)
    drain(proc, buf, 2)                  # output already in flight arrives
    paused_at = buf.count(b"tick ")
    drain(proc, buf, 4)
    out["ticks_while_paused"] = buf.count(b"tick ") - paused_at
    proc.send_signal(signal.SIGUSR2)
    out["resumed"] = read_until(proc, f"tick {paused_at + 2}".encode(), 60, buf)
    proc.send_signal(signal.SIGTERM)
    try:
        _o, err = proc.communicate(timeout=60)
        out["sigterm_rc"] = proc.returncode
        out["sigterm_stderr"] = err.decode(errors="replace")[-300:]
    except subprocess.TimeoutExpired:
        proc.kill()
        out["sigterm_rc"] = None
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
