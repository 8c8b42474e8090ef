"""Network benchmark: iperf3 guest to host and host to guest, and request/response latency
(a flood ping), for (a) Volt + virtio-net in Python, (b) Volt + virtio-net with vhost=on,
(c) QEMU -M microvm + virtio-net-device with vhost=on; one lab run, same kernel, same
guest, the host side in L1 (iperf3 server on the tap's address).

Timing is L1's wall clock: the guest prints a marker before and after each transfer of a
known size (``iperf3 -n``; ``-R`` for host to guest) and each run of N pings (``ping -f``:
the next request leaves as the reply arrives), and L1 timestamps every console line as it
arrives. So a figure is bytes / (t_end - t_begin) or (t_end - t_begin) / N, including
iperf3's connection set-up (the same for every system). Goal (issue 14): (b) at least
0.8x of (c).

Usage: python bench/net/run.py [--mib 64] [--pings 500]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from volt import lab
from volt.kernels.build import build
from volt.kernels.initramfs import base_archive

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from devtools import cache  # noqa: E402
from devtools.rootfs import debian_rootfs  # noqa: E402

VOLT = str(Path(sys.executable).with_name("volt"))
SYSTEMS = ("volt-net", "volt-vhost", "qemu-microvm")
PEER = "qemu-microvm"
GOAL = 0.8
HOST_IP = "10.0.3.1"
METRICS = {"g2h_mbs": True, "h2g_mbs": True, "rr_us": False}

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
ip addr add 10.0.3.2/24 dev eth0
ip link set eth0 up
i=0
until ping -c 1 -W 1 {host} >/dev/null 2>&1 || [ $i -ge 60 ]; do i=$((i + 1)); done
echo BENCH-NET-UP
echo BENCH-G2H-BEGIN
iperf3 -c {host} -n {mib}M >/tmp/g2h 2>&1
echo "BENCH-G2H-END $?"
echo BENCH-H2G-BEGIN
iperf3 -c {host} -n {mib}M -R >/tmp/h2g 2>&1
echo "BENCH-H2G-END $?"
echo BENCH-RR-BEGIN
/usr/bin/ping -f -q -c {pings} {host} >/tmp/rr 2>&1
echo "BENCH-RR-END $?"
tail -n 3 /tmp/g2h /tmp/h2g /tmp/rr
reboot -f
"""


def net_initramfs(mib: int, pings: int) -> Path:
    """busybox + iperf3 and iputils ping with the libraries they load (a Debian rootfs)."""
    root = debian_rootfs(("iperf3", "iputils-ping"))
    init = INIT.format(host=HOST_IP, mib=mib, pings=pings)
    name = "netbench-initramfs-" + cache.key(str(root), init, 1)
    with cache.locked(name) as out:
        if out.is_file():
            return out
        arc = base_archive(init)
        for binary in ("/usr/bin/iperf3", "/usr/bin/ping"):
            ldd = subprocess.run(["chroot", str(root), "ldd", binary], check=True,
                                 capture_output=True, text=True).stdout
            for p in [binary] + [w for line in ldd.splitlines() for w in line.split()
                                 if w.startswith("/")]:
                real = subprocess.run(["chroot", str(root), "readlink", "-f", p], check=True,
                                      capture_output=True, text=True).stdout.strip()
                arc.file(p, (root / real.lstrip("/")).read_bytes(), 0o755)
        arc.write(out)
        return out


def span(lines: list, tag: str) -> float | None:
    """Seconds between ``BENCH-TAG-BEGIN`` and a successful ``BENCH-TAG-END 0``."""
    begin = next((t for t, s in lines if s == f"BENCH-{tag}-BEGIN"), None)
    end = next((t for t, s in lines if s == f"BENCH-{tag}-END 0"), None)
    return end - begin if begin is not None and end is not None and end > begin else None


def figures(lines: list, mib: int, pings: int) -> dict[str, float]:
    out = {}
    for metric, tag in (("g2h_mbs", "G2H"), ("h2g_mbs", "H2G")):
        s = span(lines, tag)
        if s:
            out[metric] = round(mib * (1 << 20) / 1e6 / s, 2)
    s = span(lines, "RR")
    if s:
        out["rr_us"] = round(s / pings * 1e6, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB per iperf3 transfer")
    ap.add_argument("--pings", type=int, default=500, help="request/response round trips")
    ap.add_argument("--vm-timeout", type=int, default=600, help="seconds per VM run")
    args = ap.parse_args()
    kb = build()
    initrd = net_initramfs(args.mib, args.pings)
    load = os.getloadavg()
    res = lab.run([sys.executable, str(HERE / "inlab.py"), VOLT, str(kb.bzimage), str(initrd),
                   str(args.vm_timeout)], timeout=600 + 3 * args.vm_timeout, memory_mib=3072)
    res.check()
    data = json.loads(res.stdout.strip().splitlines()[-1])
    systems = {s: figures(data["systems"].get(s, {}).get("lines", []), args.mib, args.pings)
               for s in SYSTEMS}
    ratios = {s: {m: round(v / systems[PEER][m], 3) if METRICS[m]
                  else round(systems[PEER][m] / v, 3)
                  for m, v in systems[s].items() if systems[PEER].get(m)}
              for s in SYSTEMS if s != PEER}
    print(f"bench/net: {args.mib} MiB per iperf3 transfer, {args.pings} flood pings; L1 wall "
          f"clock; host load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'metric':<10}" + "".join(f"{s:>14}" for s in SYSTEMS) + "   vhost/qemu")
    for m in METRICS:
        cells = "".join(f"{systems[s].get(m, float('nan')):>14.1f}" for s in SYSTEMS)
        print(f"{m:<10}{cells}   {ratios['volt-vhost'].get(m, float('nan')):>9.3f}")
    vhost = ratios["volt-vhost"]
    missed = [f"{m} {r:.2f}x" for m, r in vhost.items() if r < GOAL]
    print(f"goal: volt-vhost >= {GOAL}x of {PEER} (latency: inverse ratio): "
          + ("met" if not missed and len(vhost) == len(METRICS)
             else "NOT met (" + (", ".join(missed) or "figures missing") + ")"))
    for e in data["errors"]:
        print(f"error: {e}")
    for s in SYSTEMS:
        if len(systems[s]) < len(METRICS):       # say why a figure is missing
            tail = [text for _, text in data["systems"].get(s, {}).get("lines", [])][-15:]
            print(f"{s}: figures missing; console tail:\n  " + "\n  ".join(tail))
    print(json.dumps({"bench": "net", "peer": PEER, "systems": systems,
                      "higher_is_better": METRICS, "ratios_to_peer": ratios,
                      "goal_ratio": GOAL, "mib": args.mib, "pings": args.pings,
                      "host_load": [round(x, 2) for x in load], "errors": data["errors"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
