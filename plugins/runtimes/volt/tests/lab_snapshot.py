"""Run inside the lab by test_snapshot_lab.py: snapshot a ticking Linux guest (Full, then
a Diff two ticks later), restore the Full one twice and the Diff once, all at once.

Usage: python lab_snapshot.py VOLT HOST_CONFIG KERNEL TICKER_INITRD
Prints one JSON object with what it observed (times from L1's clock).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time

from volt.cli.apicall import call

TICK = re.compile(rb"tick (\d+)\r?\n")     # whole lines: a read may end mid-line


def ticks_until(proc: subprocess.Popen, buf: bytearray, count: int, timeout: float) -> list[int]:
    """Read the console until ``count`` ticks arrived (or the time is up); the ticks."""
    end = time.monotonic() + timeout
    while len(TICK.findall(buf)) < count and time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
    return [int(n) for n in TICK.findall(buf)]


def main() -> int:
    volt, cfg, kernel, ticker = sys.argv[1:5]
    base = [volt, "--config", cfg, "run"]
    out: dict[str, object] = {}
    sock = "/tmp/snapshot-api.sock"          # L1's tmpfs: 9p cannot hold a unix socket
    src = subprocess.Popen([*base, "--api-sock", sock, "--landlock", "off", "--seccomp", "off",
                            "--kernel", kernel, "--initrd", ticker, "--mem", "128",
                            "--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    while not os.path.exists(sock) and src.poll() is None:
        time.sleep(0.05)
    if src.poll() is not None:
        print(json.dumps({"source_failed": src.stderr.read().decode(errors="replace")}))
        return 1
    call(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
    buf = bytearray()
    ticks_until(src, buf, 3, 300)
    for name, diff in (("snap", False), ("snap2", True)):
        # the second: a Diff, after the guest ran on for two ticks
        t0 = time.monotonic()
        r = subprocess.run([volt, "--config", cfg, "snapshot", "create", name, "--api-sock",
                            sock, "--keep-paused", "--json", *(["--diff"] if diff else [])],
                           capture_output=True, text=True, timeout=600)
        out[f"{name}_create_s"] = round(time.monotonic() - t0, 3)
        out[f"{name}_create_rc"], out[f"{name}_create_err"] = r.returncode, r.stderr[-1500:]
        out[name] = json.loads(r.stdout) if r.returncode == 0 else None
        out[f"{name}_ticks_before"] = ticks_until(src, buf, 1 << 30, 3)   # all before the pause
        call(sock, "PATCH", "/vm", {"state": "Resumed"})
        ticks_until(src, buf, len(TICK.findall(buf)) + 2, 120)
    src.send_signal(signal.SIGTERM)
    try:
        src.wait(60)
    except subprocess.TimeoutExpired:
        src.kill()
    clones = []
    t0 = time.monotonic()
    for name in ("snap", "snap", "snap2"):       # two clones of the Full one, one of the Diff
        clones.append(subprocess.Popen([*base, "--snapshot", name], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL))
    results = []
    for p in clones:
        cbuf = bytearray()
        got = ticks_until(p, cbuf, 2, 300)
        results.append({"ticks": got, "first_tick_s": round(time.monotonic() - t0, 3)})
    for p in clones:
        p.send_signal(signal.SIGTERM)
    for p, res in zip(clones, results, strict=True):
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        res["rc"], res["stderr"] = p.returncode, err.decode(errors="replace")[-1500:]
    out["clones"] = results
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
