"""Boot benchmark: Volt vs QEMU ``-M microvm``, same kernel and initramfs, inside the lab.

Figures:
- time from VMM process start to the smoke init's marker on the serial console,
  N interleaved runs each inside one lab session (nested KVM under TCG: emulated,
  not hardware timings; only the ratio against the peer is meaningful);
- on the bare machine: Volt's host-side setup time (process start to first
  KVM_RUN) and its RSS excluding guest memory.
Volt runs confined (its default: Landlock + seccomp, applied before the first
KVM_RUN, so inside both figures) and, as ``volt-unconfined``, with
``--landlock=off --seccomp=off``: the difference is the cost of confinement.
``volt-serve`` is a VM forked by a ``volt serve`` started (and pre-imported) before
the runs, timed from the request on its socket to the marker.
- on the bare machine, with one virtio-stellar device: setup split into phases
  (interpreter, imports, devices, build, confinement, start), fresh and forked.
- inside the lab: boot from a boot manifest (``volt run --boot``) of a guest that reads
  16 MiB from its root disk, without and with the manifest's prefetch set, beside QEMU
  microvm on the same ext4 image (``--only-manifest`` runs just this figure);
- on the bare machine: process start to the API socket accepting a connection
  (``--api-sock``, no kernel needed; Firecracker reports 6-60 ms for its own).
The project's modules are byte-compiled first, as an installed package is.
The last line is the benchmark JSON line of DESIGN.md.

Usage: .venv/bin/python bench/boot/run.py [-n 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from volt import lab
from volt.kernels.build import build
from volt.kernels.initramfs import smoke_initramfs

HERE = Path(__file__).resolve().parent
VOLT = str(Path(sys.executable).with_name("volt"))
GUEST_MIB = 128


def in_lab(kernel: Path, initrd: Path, n: int) -> dict:
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    res = lab.run([sys.executable, str(HERE / "inlab.py"), VOLT, str(kernel), str(initrd),
                   str(n)], timeout=300 + 120 * n, env=env)
    res.check()
    return json.loads(res.stdout.strip().splitlines()[-1])


#: The payload the disk-reading guest reads through its root disk (256 chunks of 64 KiB).
PAYLOAD_MIB = 16
DISK_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t ext4 -o ro /dev/vda /mnt && echo "BENCH-DISK-READ $(md5sum < /mnt/payload)"
reboot -f
"""


def manifest_in_lab(kernel: Path, n: int) -> dict:
    """Issue 12's boot-from-manifest figure: a guest that reads PAYLOAD_MIB from its root
    disk, booted from a boot manifest without and with its prefetch set (recorded from a
    traced first boot in the same lab session), beside QEMU microvm reading the same ext4
    image through virtio-blk. Seconds from process start to the guest's read marker."""
    import shutil

    from volt.kernels.initramfs import base_archive

    work = Path(tempfile.mkdtemp(prefix="bench-boot-manifest-"))
    try:
        tree = work / "tree"
        tree.mkdir()
        (tree / "payload").write_bytes(os.urandom(PAYLOAD_MIB << 20))
        disk = work / "root.ext4"
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(disk),
                        f"{PAYLOAD_MIB + 16}M"], check=True, capture_output=True, timeout=120)
        initrd = base_archive(DISK_INIT).write(work / "init.cpio")
        cfg = work / "host.toml"
        cfg.write_text('[store]\npath = "store"\n')
        for argv in (["-m", "stellarium_core", "--config", str(cfg), "host", "init"],
                     ["-m", "stellarium_core", "--config", str(cfg), "vol", "import", "root",
                      str(disk)]):
            subprocess.run([sys.executable, *argv], check=True, capture_output=True,
                           timeout=300)
        subprocess.run([VOLT, "--config", str(cfg), "kernel", "import", str(kernel),
                        "--initrd", str(initrd), "--name", "guest"], check=True,
                       capture_output=True, timeout=300)
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
        res = lab.run([sys.executable, str(HERE / "inlab.py"), "--manifest", VOLT, str(cfg),
                       str(disk), str(kernel), str(n)], timeout=900 + 300 * n, env=env,
                      writable=[work])
        res.check()
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def print_manifest(fig: dict) -> None:
    print(f"boot from a manifest, guest reads {PAYLOAD_MIB} MiB from its root disk, inside "
          f"the lab (seconds to the read marker; prefetch set {fig['prefetch_chunks']} "
          "chunks; every run starts with an empty hot tier and dropped caches):")
    for name, label in (("volt-manifest", "volt run --boot, no prefetch"),
                        ("volt-manifest-prefetch", "volt run --boot, prefetch"),
                        ("qemu", "qemu microvm, virtio-blk")):
        runs = fig[name]
        print(f"  {label:<30} median {statistics.median(runs):7.3f}  "
              f"runs {[round(x, 3) for x in runs]}" if runs else f"  {label:<30} no runs")
    ms = [x for x in fig["prefetch_ms"] if x is not None]
    if ms:
        print(f"  prefetch phase (before the vCPUs start): median {statistics.median(ms):.1f} ms")
    for e in fig["errors"]:
        print(f"  error: {e}")


def manifest_systems(fig: dict) -> dict[str, dict[str, float | None]]:
    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 3) if xs else None

    return {"volt-manifest": {"disk_boot_s": med(fig["volt-manifest"])},
            "volt-manifest-prefetch": {
                "disk_boot_s": med(fig["volt-manifest-prefetch"]),
                "prefetch_ms": med([x for x in fig["prefetch_ms"] if x is not None])},
            "qemu-microvm": {"disk_boot_s": med(fig["qemu"])}}


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


ENTRIES = {"volt": [VOLT, "run"], "volt-vmm": [sys.executable, "-m", "volt.vmm"],
           "volt-unconfined": [VOLT, "run", "--landlock=off", "--seccomp=off"]}


def bare_setup(entry: list[str], kernel: Path, initrd: Path, n: int) -> dict:
    """Setup time and RSS of a Volt entry point on this machine's (emulated) /dev/kvm."""
    setups, rss = [], []
    for _ in range(n):
        proc = subprocess.Popen([*entry, "--kernel", str(kernel), "--initrd", str(initrd),
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


def api_socket_ms(entry: list[str], n: int) -> list[float]:
    """Spawn to the first successful connect() on ``--api-sock``, ``n`` times (ms)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "api.sock")
        for _ in range(n):
            t0 = time.monotonic()
            proc = subprocess.Popen([*entry, "--api-sock", sock], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while proc.poll() is None and time.monotonic() - t0 < 30:
                with socket.socket(socket.AF_UNIX) as c:
                    try:
                        c.connect(sock)
                    except OSError:
                        time.sleep(0.0002)
                        continue
                out.append(round(1000 * (time.monotonic() - t0), 2))
                break
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if os.path.exists(sock):
                os.unlink(sock)
    return out


def json_line(lab_fig: dict, bare: dict, api: dict, phases: dict[str, list[dict]],
              manifest: dict | None = None) -> dict:
    """The DESIGN.md line: medians per system, Volt's beside QEMU microvm's."""
    def med(xs: list[float]) -> float | None:
        return round(statistics.median(xs), 3) if xs else None

    systems = {"qemu-microvm": {"boot_s": med(lab_fig["qemu"])}}
    for name in ENTRIES:
        systems[name] = {"boot_s": med(lab_fig[name]), "setup_ms": med(bare[name]["setup_ms"]),
                         "api_socket_ms": med(api.get(name, []))}
    systems["volt-serve"] = {"boot_s": med(lab_fig.get("volt-serve", []))}
    for kind, runs in phases.items():        # one virtio-stellar device, bare machine
        systems["volt-vmm" if kind == "fresh" else "volt-serve"]["device_setup_ms"] = \
            med([r["setup"] for r in runs if r])
    for name, figs in manifest_systems(manifest).items() if manifest else ():
        systems.setdefault(name, {}).update(figs)
    return {"bench": "boot", "peer": "qemu-microvm", "systems": systems,
            "higher_is_better": {"boot_s": False, "setup_ms": False, "api_socket_ms": False,
                                 "device_setup_ms": False, "disk_boot_s": False,
                                 "prefetch_ms": False},
            "host_load": [round(x, 2) for x in os.getloadavg()],
            "firecracker_api_socket_ms": [6, 60]}


def compile_bytecode() -> None:
    """Compile the project's modules as ``pip install`` does for an installed package; a
    checkout run with PYTHONDONTWRITEBYTECODE would otherwise compile every module from
    source at every VMM start (inside the lab, over 9p, for seconds)."""
    import compileall

    root = HERE.parents[1]
    for d in [root / "stellarium_core", *sorted((root / "plugins").glob("*/*"))]:
        compileall.compile_dir(str(d), quiet=1)


def parse_phases(stderr: str) -> dict[str, float]:
    """``volt: setup 48.2 ms (...): interpreter 9.9, imports 20.1, ...`` as a dict."""
    for line in stderr.splitlines():
        if line.startswith("volt: setup ") and "): " in line:
            out = {"setup": float(line.split()[2])}
            for part in line.split("): ", 1)[1].split(", "):
                name, _, ms = part.rpartition(" ")
                out[name] = float(ms)
            return out
    return {}


def device_setup_phases(kernel: Path, initrd: Path, n: int) -> dict[str, list[dict]]:
    """Issue 11's start-up figure on this machine: process start to first KVM_RUN with one
    virtio-stellar device, split into phases, for a fresh ``python -m volt.vmm`` and for
    a VM forked by ``volt serve`` (setup counted from the fork)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "host.toml"
        cfg.write_text('[store]\npath = "store"\n')
        for args in (["host", "init"], ["vol", "create", "vm0", "64MiB"]):
            subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                            *args], check=True, capture_output=True)
        vm = ["--config", str(cfg), "--kernel", str(kernel), "--initrd", str(initrd),
              "--mem", str(GUEST_MIB), "--serial", "none", "--timing",
              "--device", "virtio-stellar,volume=vm0"]
        sock = Path(tmp) / "serve.sock"
        server = subprocess.Popen([VOLT, "--config", str(cfg), "serve", str(sock)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not sock.is_socket() and server.poll() is None:
            time.sleep(0.05)
        out: dict[str, list[dict]] = {"fresh": [], "forked": []}
        try:
            for _ in range(n):
                for kind, argv in (("fresh", [sys.executable, "-m", "volt.vmm", *vm]),
                                   ("forked", [VOLT, "spawn", str(sock), "--", *vm])):
                    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)
                    time.sleep(3)
                    proc.send_signal(signal.SIGTERM)
                    out[kind].append(parse_phases(proc.communicate(timeout=60)[1]))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    return out


def print_device_phases(phases: dict[str, list[dict]]) -> None:
    for kind, runs in phases.items():
        runs = [r for r in runs if r]
        if not runs:
            print(f"bare machine, {kind}: no setup figures")
            continue
        names = list(runs[0])
        split = ", ".join(f"{k} {statistics.median(r.get(k, 0) for r in runs):.1f}"
                          for k in names)
        print(f"bare machine, one virtio-stellar device, {kind} "
              f"({'python -m volt.vmm' if kind == 'fresh' else 'volt serve'}): "
              f"medians ms: {split}  (goal: setup <= 50 ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5, help="runs per VMM")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only-manifest", action="store_true",
                    help="only the boot-from-manifest figure (with and without prefetch)")
    args = ap.parse_args()
    kb = build()
    initrd = smoke_initramfs()
    compile_bytecode()
    manifest = manifest_in_lab(kb.bzimage, args.n)
    if args.only_manifest:
        print_manifest(manifest)
        print(json.dumps({"bench": "boot", "peer": "qemu-microvm",
                          "systems": manifest_systems(manifest),
                          "higher_is_better": {"disk_boot_s": False, "prefetch_ms": False},
                          "host_load": [round(x, 2) for x in os.getloadavg()]}))
        return 0
    lab_fig = in_lab(kb.bzimage, initrd, args.n)
    bare = {name: bare_setup(entry, kb.bzimage, initrd, min(args.n, 3))
            for name, entry in ENTRIES.items()}
    api = {name: api_socket_ms(entry, args.n) for name, entry in ENTRIES.items()}
    phases = device_setup_phases(kb.bzimage, initrd, min(args.n, 5))
    result = {"lab": lab_fig, "bare": bare, "api_socket_ms": api, "kernel": str(kb.bzimage),
              "initrd": str(initrd), "device_setup_phases": phases, "manifest": manifest}
    if args.json:
        print(json.dumps(result, indent=2))
        print(json.dumps(json_line(lab_fig, bare, api, phases, manifest)))
        return 0
    labels = {"volt": "volt run", "volt-vmm": "python -m volt.vmm",
              "volt-unconfined": "volt run, unconfined",
              "volt-serve": "volt serve (forked)", "qemu": "qemu -M microvm"}
    q = lab_fig["qemu"]
    print(f"boot to init marker, inside the lab, {args.n} interleaved runs each (seconds):")
    for name, label in labels.items():
        runs = lab_fig[name]
        if not runs:
            print(f"  {label:<20} no successful runs")
            continue
        ratio = f"  ratio to qemu {statistics.median(runs) / statistics.median(q):.2f}" \
            if q and name != "qemu" else ""
        print(f"  {label:<20} median {statistics.median(runs):7.3f}  "
              f"runs {[round(x, 3) for x in runs]}{ratio}")
    for e in lab_fig["errors"]:
        print(f"  error: {e}")
    print_manifest(manifest)
    print_device_phases(phases)
    for name, fig in bare.items():
        s = fig["setup_ms"]
        if s:
            print(f"bare machine, {labels[name]}: setup (process start -> first KVM_RUN) "
                  f"median {statistics.median(s):.1f} ms  runs {s}")
        for total, outside in fig["rss"]:
            print(f"bare machine, {labels[name]}: RSS {total / 2**20:.1f} MiB total, "
                  f"{outside / 2**20:.1f} MiB excluding guest memory")
    for name, ms in api.items():
        if ms:
            print(f"bare machine, {labels[name]}: process start -> API socket accepting "
                  f"median {statistics.median(ms):.1f} ms  runs {ms}  (Firecracker: 6-60 ms)")
    print(json.dumps(json_line(lab_fig, bare, api, phases, manifest)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
