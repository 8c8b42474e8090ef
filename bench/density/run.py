"""Density benchmark: host memory per added VM when N VMs boot one Debian base and each
reads the same files, in one lab run, side by side:

- (a) ``qemu-microvm``: QEMU -M microvm, virtio-blk on a per-VM qcow2 overlay of the base;
- (b) ``volt-stellar``: Volt, virtio-stellar on a per-VM clone of the base volume;
- (c) ``volt-pmem``: Volt, the base mapped read-only by virtio-pmem, mounted with DAX;
- (d) ``volt-pmem-ksm``: (c) with guest RAM offered to KSM (``--ksm``);
- (e) ``volt-serve``: (d) with every VM forked from one pre-started ``volt serve``.

Every guest mounts the base read-only (ext4; ``-o dax`` on pmem) under a tmpfs overlay,
reads every file below /usr once (``tar``), prints its READY marker and idles. After each
VM, inlab.py samples the VMM processes' summed PSS, the data files' page cache that no
VMM maps, and the private pages of the guests' RAM (see inlab.py). ``marginal_mib`` is
the least-squares slope of PSS + page cache over the VM count, from the second VM on
(the first pays for warming the shared pages); ``marginal_beyond_guest_mib`` is each
added VM's cost minus the private pages of its own guest RAM (``beyond_guest``).

Goal (issue 12): (e) at most 10 MiB per added VM beyond the guest's own private pages,
and below (a). From each marginal cost it prints how many such VMs fit in 64 GB.

Usage: python bench/density/run.py [--vms 8] [--mem 256] [--systems a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from volt import lab
from volt.kernels.build import build
from volt.kernels.initramfs import base_archive

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from devtools.rootfs import debian_rootfs  # noqa: E402
from devtools.stellar_host import ext4_image, host_with_volume, stellar  # noqa: E402

PEER = "qemu-microvm"
SYSTEMS = (PEER, "volt-stellar", "volt-pmem", "volt-pmem-ksm", "volt-serve")
GOAL_SYSTEM, GOAL_MIB = "volt-serve", 10.0
HOST_MIB = 64 * 1000**3 // 2**20        # "a 64 GB host"

#: Run by Debian's /bin/sh as PID 1 on the overlay root: read the files, say so, idle.
SCRIPT = ("mount -t proc proc /proc; n=$(tar cf - /usr 2>/dev/null | wc -c); "
          "echo DENSITY-READY $n; exec sleep 100000")
INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
ROOT=vda
for x in $(cat /proc/cmdline); do
  case "$x" in density.root=*) ROOT="${x#density.root=}";; esac
done
OPTS=ro; [ "$ROOT" = pmem0 ] && OPTS=ro,dax
i=0
while [ ! -b /dev/$ROOT ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mkdir -p /base /rw /newroot
if mount -t ext4 -o $OPTS /dev/$ROOT /base; then
  mount -t tmpfs tmpfs /rw && mkdir /rw/upper /rw/work
  mount -t overlay overlay -o lowerdir=/base,upperdir=/rw/upper,workdir=/rw/work /newroot
  umount /sys /proc
  exec switch_root /newroot /bin/sh -c '""" + SCRIPT + r"""'
fi
echo "DENSITY-FAILED mounting /dev/$ROOT"
reboot -f
"""


def slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of (vms, MiB), from the second VM on."""
    pts = [(x, y) for x, y in points if x >= 2]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def beyond_guest(rows: list[dict]) -> float | None:
    """Mean cost of each added VM (from the second on) minus its own guest's private RAM
    pages at that moment. Not a slope of (total - all guests' private pages): KSM keeps
    merging the earlier guests' pages, which would count as a saving of the newest VM."""
    steps = [b["pss_mib"] + b["cache_mib"] - a["pss_mib"] - a["cache_mib"]
             - b["newest_guest_private_mib"] for a, b in zip(rows, rows[1:], strict=False)]
    return sum(steps) / len(steps) if steps else None


def prepare(work: Path, kernel: Path, vms: int) -> None:
    """The base as an ext4 file, a qcow2 overlay and a volume clone per VM, the store."""
    # DAX needs blocks of a page
    img = ext4_image(debian_rootfs(), work / "base.ext4", "320M", "-b", "4096")
    cfg = host_with_volume(work, "base", img, "--mappable")
    for k in range(vms):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(img), "-F", "raw",
                        str(work / f"vm{k}.qcow2")], check=True)
        stellar(cfg, "vol", "clone", "base", f"vm{k}")
    shutil.copy(kernel, work / "bzImage")
    base_archive(INIT).write(work / "init.cpio")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=8, help="VMs per system (>= 3)")
    ap.add_argument("--mem", type=int, default=256, help="MiB of RAM per guest")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated systems to run (default: all)")
    args = ap.parse_args()
    names = [s for s in SYSTEMS if s in args.systems.split(",")]
    kb = build()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="density-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        prepare(work, kb.bzimage, args.vms)
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") \
            else None
        # Everything is copied into L1's tmpfs first: packs are mapped from there, and the
        # lab's 9p share of the host's disk would not share pages across VMs.
        script = (f"cp -a {work} /dev/shm/density && "
                  f"exec {sys.executable} {HERE / 'inlab.py'} /dev/shm/density "
                  f"{','.join(names)} {args.vms} {args.mem}")
        res = lab.run(["/bin/sh", "-c", script], env=env,
                      timeout=600 + len(names) * args.vms * 400,
                      memory_mib=3072 + args.vms * args.mem * 2)
    res.check()
    data = json.loads(res.stdout.strip().splitlines()[-1])
    report(data, names, args, load)
    return 0


def report(data: dict, names: list[str], args: argparse.Namespace, load: tuple) -> None:
    print(f"bench/density: {args.vms} VMs x {args.mem} MiB per system, each reading /usr of "
          f"one Debian base; L1 figures after each VM; host load before "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'system':<16}{'VMs':>4}{'PSS MiB':>10}{'cache MiB':>11}{'guest priv':>12}"
          f"{'L1 used':>10}")
    systems: dict[str, dict[str, float]] = {}
    for s in names:
        rows = data.get(s, [])
        for r in rows:
            print(f"{s:<16}{r['vms']:>4}{r['pss_mib']:>10.1f}{r['cache_mib']:>11.1f}"
                  f"{r['guest_private_mib']:>12.1f}{r['used_mib']:>10.1f}")
        total = [(r["vms"], r["pss_mib"] + r["cache_mib"]) for r in rows]
        m, mb = slope(total), beyond_guest(rows)
        used = slope([(r["vms"], r["used_mib"]) for r in rows])
        if m is None or mb is None or used is None:
            continue
        last = rows[-1]
        systems[s] = {"marginal_mib": round(m, 2), "marginal_beyond_guest_mib": round(mb, 2),
                      "marginal_l1_used_mib": round(used, 2),
                      "total_mib": round(last["pss_mib"] + last["cache_mib"], 1),
                      "vms_per_64gb": int(HOST_MIB // max(m, 0.01))}
    print(f"{'system':<16}{'marginal MiB':>14}{'beyond guest':>14}{'L1 used':>10}"
          f"{'VMs in 64 GB':>14}")
    for s, f in systems.items():
        print(f"{s:<16}{f['marginal_mib']:>14.2f}{f['marginal_beyond_guest_mib']:>14.2f}"
              f"{f['marginal_l1_used_mib']:>10.2f}{f['vms_per_64gb']:>14}")
    goal = systems.get(GOAL_SYSTEM)
    peer = systems.get(PEER)
    if goal is not None and peer is not None:
        met = (goal["marginal_beyond_guest_mib"] <= GOAL_MIB
               and goal["marginal_mib"] < peer["marginal_mib"])
        print(f"goal: {GOAL_SYSTEM} <= {GOAL_MIB} MiB per added VM beyond its guest's private "
              f"pages ({goal['marginal_beyond_guest_mib']:.2f}) and below {PEER} "
              f"({goal['marginal_mib']:.2f} vs {peer['marginal_mib']:.2f}): "
              + ("met" if met else "NOT met"))
    for e in data.get("errors", []):
        print(f"error: {e}")
    print(json.dumps({"bench": "density", "peer": PEER, "systems": systems,
                      "higher_is_better": {"marginal_mib": False,
                                           "marginal_beyond_guest_mib": False,
                                           "marginal_l1_used_mib": False,
                                           "total_mib": False, "vms_per_64gb": True},
                      "vms": args.vms, "mem_mib": args.mem, "goal_mib": GOAL_MIB,
                      "samples": {s: data.get(s, []) for s in names},
                      "host_load": [round(x, 2) for x in load],
                      "errors": data.get("errors", [])}))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
