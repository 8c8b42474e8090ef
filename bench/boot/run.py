"""Boot benchmark: Volt vs QEMU ``-M microvm``, same kernel and initramfs, inside the lab.

Figures:
- time from VMM process start to the smoke init's marker on the serial console,
  N interleaved runs each inside one lab session (nested KVM under TCG: emulated,
  not hardware timings; only the ratio against the peer is meaningful);
- on the bare machine: Volt's host-side setup time (process start to first
  KVM_RUN) and its RSS excluding guest memory.

Usage: .venv/bin/python bench/boot/run.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from volt import lab
from volt.kernels.build import build
from volt.kernels.initramfs import smoke_initramfs

HERE = Path(__file__).resolve().parent
VOLT = str(Path(sys.executable).with_name("volt"))
GUEST_MIB = 128


def in_lab(kernel: Path, initrd: Path, n: int) -> dict:
    res = lab.run([sys.executable, str(HERE / "inlab.py"), VOLT, str(kernel), str(initrd),
                   str(n)], timeout=300 + 120 * n)
    res.check()
    return json.loads(res.stdout.strip().splitlines()[-1])


def rss_excluding_guest(pid: int, guest_bytes: int) -> tuple[int, int]:
    """(total RSS, RSS outside the guest-memory mapping) in bytes, from smaps."""
    total = outside = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts[0] == "Size:":
                size = int(parts[1]) * 1024
            elif parts[0] == "Rss:":
                rss = int(parts[1]) * 1024
                total += rss
                if size != guest_bytes:
                    outside += rss
    return total, outside


def bare_setup(kernel: Path, initrd: Path, n: int) -> dict:
    """Setup time and RSS of ``volt run`` on this machine's (emulated) /dev/kvm."""
    setups, rss = [], []
    for _ in range(n):
        proc = subprocess.Popen([VOLT, "run", "--kernel", str(kernel), "--initrd", str(initrd),
                                 "--mem", str(GUEST_MIB), "--serial", "none", "--timing"],
                                stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        if proc.poll() is None:
            rss.append(rss_excluding_guest(proc.pid, GUEST_MIB << 20))
            proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        for line in err.splitlines():
            if line.startswith("volt: setup "):
                setups.append(float(line.split()[2]))
    return {"setup_ms": setups, "rss": rss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="runs per VMM")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kb = build()
    initrd = smoke_initramfs()
    lab_fig = in_lab(kb.bzimage, initrd, args.n)
    bare = bare_setup(kb.bzimage, initrd, min(args.n, 3))
    result = {"lab": lab_fig, "bare": bare, "kernel": str(kb.bzimage), "initrd": str(initrd)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    v, q = lab_fig["volt"], lab_fig["qemu"]
    print(f"boot to init marker, inside the lab, {args.n} runs each (seconds):")
    print(f"  volt             median {statistics.median(v):.3f}  runs {[round(x, 3) for x in v]}"
          if v else "  volt             no successful runs")
    print(f"  qemu -M microvm  median {statistics.median(q):.3f}  runs {[round(x, 3) for x in q]}"
          if q else "  qemu -M microvm  no successful runs")
    if v and q:
        print(f"  ratio volt/qemu  {statistics.median(v) / statistics.median(q):.2f}")
    for e in lab_fig["errors"]:
        print(f"  error: {e}")
    s = bare["setup_ms"]
    if s:
        print(f"bare machine: setup (process start -> first KVM_RUN) median "
              f"{statistics.median(s):.1f} ms  runs {s}")
    for total, outside in bare["rss"]:
        print(f"bare machine: VMM RSS {total / 2**20:.1f} MiB total, "
              f"{outside / 2**20:.1f} MiB excluding guest memory")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
