"""Block benchmark: fio in a guest, (a) Volt + virtio-stellar over a Stellarium volume,
(b) Volt + virtio-blk over a raw file, (c) QEMU -M microvm + virtio-blk-device over the
same raw file; one lab run, same kernel, same initramfs, same content.

Workloads on /dev/vda, all O_DIRECT through libaio: sequential read and write in 1 MiB
blocks (iodepth 1) over the whole disk, 4 KiB random reads at iodepth 1 and 32.
Timing is L1's wall clock: the guest prints a marker before and after each fio run and
the runner inside L1 timestamps every console line as it arrives (clocks inside an L2
guest drift differently per VMM). Each workload also runs once with a single block
(32 at iodepth 32) right before; that run's time is fio's fixed cost (start-up, console
output) and is subtracted, so the figure is known bytes (ops) / (t_full - t_single).
fio's own figures (guest clock) are printed as a secondary column. Goal (issue 11):
(a) and (b) at least 0.8x of (c) on every figure.

(d) ``volt-vhost`` is Volt with ``--device vhost-user-blk`` over the same volume served by
``stellar vol serve --vhost-user`` (another process). Two more systems isolate costs:
``volt-unconfined`` is (a) with ``--landlock=off
--seccomp=off`` (what confinement costs, issue 15), ``volt-stellar-noverify`` is (a) over
the same store with ``verify_reads = false`` (what hashing each chunk costs).

Further, unmeasured runs of (a) and (b) under ``py-spy record`` give the profile summary
of Volt's threads, the device (I/O) thread in detail.

Usage: python bench/blk/run.py [--size-mib 256] [--rand-ops 2000] [--no-profile]
       [--systems a,b,...]
"""

from __future__ import annotations

import argparse
import collections
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
PY_SPY = str(Path(sys.executable).with_name("py-spy"))
PEER = "qemu-microvm"
#: The goal's systems, (a) and (b), then the peer (c), (d) Volt over the volume exported
#: by ``stellar vol serve --vhost-user``, then what isolates a cost: (a) without
#: confinement (#15) and (a) without read verification (hashing).
GOAL_SYSTEMS = ("volt-stellar", "volt-blk")
SYSTEMS = (*GOAL_SYSTEMS, PEER, "volt-vhost", "volt-unconfined", "volt-stellar-noverify")
#: workload -> (metric, per-op unit, is a write)
WORKLOADS = {
    "seqread": ("seq_read_mbs", "MB/s", False),
    "seqwrite": ("seq_write_mbs", "MB/s", True),
    "randread1": ("randread_qd1_iops", "IOPS", False),
    "randread32": ("randread_qd32_iops", "IOPS", False),
}
GOAL = 0.8

INIT = r"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
SIZE=16; OPS=100
for x in $(cat /proc/cmdline); do
  case "$x" in bench.size=*) SIZE="${x#bench.size=}";; bench.ops=*) OPS="${x#bench.ops=}";; esac
done
job() {  # NAME FIO-ARGS...: markers around one fio run on the disk
  name=$1; shift
  echo "BENCH-BEGIN $name"
  fio --minimal --thread --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio "$@"
  echo "BENCH-END $name $?"
}
job seqread.single --rw=read --bs=1M --size=1M
job seqread --rw=read --bs=1M --size="${SIZE}M"
RAND="--rw=randread --bs=4k --size=${SIZE}M --norandommap"
job randread1.single $RAND --iodepth=1 --number_ios=1
job randread1 $RAND --iodepth=1 --number_ios="$OPS"
job randread32.single $RAND --iodepth=32 --number_ios=32
job randread32 $RAND --iodepth=32 --number_ios="$OPS"
job seqwrite.single --rw=write --bs=1M --size=1M
job seqwrite --rw=write --bs=1M --size="${SIZE}M"
echo BENCH-DONE
sync
reboot -f
"""


def fio_initramfs() -> Path:
    """busybox + fio and the shared libraries it loads, from a Debian rootfs (cached)."""
    root = debian_rootfs(("fio",))
    name = "blkbench-initramfs-" + cache.key(str(root), INIT, 1)
    with cache.locked(name) as out:
        if out.is_file():
            return out
        ldd = subprocess.run(["chroot", str(root), "ldd", "/usr/bin/fio"], check=True,
                             capture_output=True, text=True).stdout
        paths = ["/usr/bin/fio"] + [w for line in ldd.splitlines() for w in line.split()
                                    if w.startswith("/")]
        arc = base_archive(INIT)
        for p in paths:
            real = subprocess.run(["chroot", str(root), "readlink", "-f", p], check=True,
                                  capture_output=True, text=True).stdout.strip()
            arc.file(p, (root / real.lstrip("/")).read_bytes(), 0o755)
        arc.write(out)
        return out


def figures(lines: list[list], size_mib: int, ops: int) -> dict[str, dict[str, float]]:
    """Per workload: L1 wall seconds (full, single), the derived figure, fio's own figure."""
    begin: dict[str, float] = {}
    took: dict[str, float] = {}
    terse: dict[str, list[str]] = {}
    current = None
    for t, text in lines:
        if text.startswith("BENCH-BEGIN "):
            current = text.split()[1]
            begin[current] = t
        elif text.startswith("BENCH-END ") and current is not None:
            name, rc = text.split()[1:3]
            if rc == "0":
                took[name] = t - begin[name]
        elif current is not None and text.startswith("3;fio-"):
            terse[current] = text.split(";")
    out = {}
    for name, (_metric, unit, write) in WORKLOADS.items():
        if name not in took or f"{name}.single" not in took:
            continue
        net = took[name] - took[f"{name}.single"]
        if unit == "MB/s":
            amount, single = size_mib * 2**20 / 1e6, 2**20 / 1e6
        else:
            amount, single = ops, (32 if name.endswith("32") else 1)
        f = terse.get(name, [])
        fio = float(f[47 if write else 6]) * 1024 / 1e6 if unit == "MB/s" and f else \
            float(f[48 if write else 7]) if f else None
        out[name] = {"value": (amount - single) / net if net > 0 else None,
                     "seconds": took[name], "single_seconds": took[f"{name}.single"],
                     "fio_guest_clock": fio}
    return out


def profile_summary(stacks: list[str], top: int = 12) -> dict:
    """Where Volt's threads spend their samples, from py-spy's collapsed stacks.

    The I/O thread is idle when its innermost Python frame is ``_io_loop`` (blocked
    in epoll); a vCPU thread is in the guest when it is inside KVM_RUN.
    """
    per_thread: collections.Counter = collections.Counter()
    idle: collections.Counter = collections.Counter()
    leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl_io: collections.Counter = collections.Counter()
    for line in stacks:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if len(frames) < 2 or not count.isdigit():
            continue
        n = int(count)
        thread = frames[0].split(": ", 1)[-1]
        per_thread[thread] += n
        leaf = frames[-1].split(" (")[0]
        if leaf.endswith("_io_loop"):
            idle[thread] += n
            continue
        leaves[thread][frames[-1]] += n
        if thread == "io":
            for fr in set(frames[1:]):
                incl_io[fr.split(" (")[0]] += n
    return {
        "threads": {t: {"samples": c, "idle": idle[t],
                        "top": leaves[t].most_common(3 if t != "io" else top)}
                    for t, c in per_thread.items()},
        "io_busy_samples": per_thread["io"] - idle["io"],
        "io_inclusive": incl_io.most_common(top * 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256, help="disk size, and bytes per "
                    "sequential pass")
    ap.add_argument("--rand-ops", type=int, default=2000, help="4 KiB reads per random run")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy runs")
    ap.add_argument("--vm-timeout", type=int, default=900, help="seconds per VM run")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated systems to run (default: all)")
    args = ap.parse_args()
    names = [s for s in SYSTEMS if s in args.systems.split(",")]
    kb = build()
    initrd = fio_initramfs()
    load = os.getloadavg()
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    res = lab.run([sys.executable, str(HERE / "inlab.py"), VOLT, str(kb.bzimage), str(initrd),
                   str(args.size_mib), str(args.rand_ops), "0" if args.no_profile else "1",
                   PY_SPY, str(args.vm_timeout), ",".join(names)],
                  timeout=900 + (len(names) + 2) * args.vm_timeout,
                  memory_mib=2048 + 4 * args.size_mib, env=env)
    res.check()
    data = json.loads(res.stdout.strip().splitlines()[-1])
    figs = {name: figures(data["systems"].get(name, {}).get("lines", []), args.size_mib,
                          args.rand_ops) for name in names}
    print(f"bench/blk: fio in the guest, {args.size_mib} MiB disk, {args.rand_ops} random "
          f"reads per run; L1 wall clock minus fio's fixed cost (single-block run); "
          f"host load before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    others = [s for s in names if s != PEER]
    print(f"{'workload':<12}" + "".join(f"{s:>22}" for s in names)
          + "".join(f"  {s + '/peer':>22}" for s in others))
    systems: dict[str, dict[str, float]] = {s: {} for s in names}
    ratios: dict[str, dict[str, float]] = {s: {} for s in others}
    for name, (metric, unit, _) in WORKLOADS.items():
        vals = {s: figs[s].get(name, {}).get("value") for s in names}
        for s, v in vals.items():
            if v is not None:
                systems[s][metric] = round(v, 2)
        peer = vals.get(PEER)
        for s in ratios:
            if vals[s] is not None and peer:
                ratios[s][metric] = round(vals[s] / peer, 3)
        cells = "".join(f"{v:>17.1f} {unit:<4}" if v is not None else f"{'-':>22}"
                        for v in vals.values())
        rs = "".join(f"  {ratios[s].get(metric, float('nan')):>22.3f}" for s in others)
        print(f"{name:<12}{cells}{rs}")
    print("fio's own figures (guest clock, not comparable across VMMs): " + "; ".join(
        f"{s} " + " / ".join(f"{figs[s].get(w, {}).get('fio_guest_clock') or float('nan'):.1f}"
                             for w in WORKLOADS) for s in names))
    goal = [s for s in GOAL_SYSTEMS if s in ratios]
    missed = [f"{s} {m} {r:.2f}x" for s in goal for m, r in ratios[s].items() if r < GOAL]
    print(f"goal: {' and '.join(goal)} >= {GOAL}x of {PEER} on every figure: "
          + ("met" if goal and not missed and all(len(ratios[s]) == 4 for s in goal)
             else "NOT met (" + ", ".join(missed) + ")"))
    for e in data["errors"]:
        print(f"error: {e}")
    for name, stacks in data["profiles"].items():
        print_profile(name, profile_summary(stacks))
    print(json.dumps({"bench": "blk", "peer": PEER, "systems": systems,
                      "higher_is_better": {m: True for m, _, _ in WORKLOADS.values()},
                      "ratios_to_peer": ratios, "goal_ratio": GOAL,
                      "size_mib": args.size_mib, "rand_ops": args.rand_ops,
                      "host_load": [round(x, 2) for x in load], "detail": figs,
                      "errors": data["errors"]}))
    return 0


def print_profile(system: str, p: dict) -> None:
    print(f"py-spy profile of {system} (a separate, unmeasured run of the same workloads; "
          "100 Hz, all threads):")
    for t, c in sorted(p["threads"].items(), key=lambda kv: -kv[1]["samples"]):
        total = max(c["samples"], 1)
        print(f"  thread {t:<14} {c['samples']:>7} samples, {c['idle']:>7} idle in epoll; "
              "innermost frames:")
        for f, n in c["top"] if t != "io" else c["top"][:3]:
            print(f"      {100 * n / total:5.1f}%  {f}")
    busy = max(p["io_busy_samples"], 1)
    print(f"  device (io) thread, {p['io_busy_samples']} busy samples; innermost frames:")
    for f, c in p["threads"].get("io", {}).get("top", []):
        print(f"    {100 * c / busy:5.1f}%  {f}")
    print("  inclusive (time under each function):")
    for f, c in p["io_inclusive"]:
        print(f"    {100 * c / busy:5.1f}%  {f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
