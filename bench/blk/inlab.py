"""Runs inside the lab (L1): fio in an L2 guest under each VMM, timed from L1's clock.

Everything lives on one tmpfs mounted here (not the 9p share): the raw disk file,
its pristine copy, the Stellarium store, the kernel and the initramfs. Each system
starts from the same content: the raw file is copied from the pristine one, the
volume is a fresh clone of the one imported from it.

Prints one JSON object: {"systems": {name: {"lines": [[seconds, text], ...], "exit": rc}},
"profiles": {name: [collapsed py-spy stacks...]}, "errors": [...]}. The profiled runs of
Volt come after the measured ones, so py-spy never competes with a measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from devtools.lab_vm import run_vm  # noqa: E402

WORK = Path("/var/tmp/blkbench")
VHOST_SOCKET = WORK / "vhost.sock"
GUEST_MIB = 512
CMDLINE = "console=ttyS0 panic=-1 quiet"


def run_vmm(argv: list[str], timeout: float, profile_out: Path | None = None,
            py_spy: str = "") -> tuple[list[tuple[float, str]], int, str]:
    """:func:`devtools.lab_vm.run_vm` with progress on stderr and, for a profiled run,
    py-spy attached to the VMM."""
    spies: list[subprocess.Popen] = []

    def attach(proc: subprocess.Popen) -> None:
        spies.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(proc.pid), "--format", "raw", "--threads",
             "--idle", "--nonblocking", "--rate", "100", "-o", str(profile_out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def progress(text: str, _proc: subprocess.Popen) -> None:
        if text.startswith("BENCH-"):
            print(f"{time.monotonic():10.3f} {text}", file=sys.stderr, flush=True)

    res = run_vm(argv, timeout, progress, on_start=attach if profile_out is not None else None)
    for spy in spies:
        spy.wait(timeout=120)
    return res["lines"], res["exit"], res["stderr"][-2000:]


def vhost_server(cfg: Path) -> subprocess.Popen:
    """``stellar vol serve`` of the run's volume, listening once this returns."""
    VHOST_SOCKET.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                               "vol", "serve", "run", "--vhost-user", str(VHOST_SOCKET)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not VHOST_SOCKET.is_socket():
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("stellar vol serve did not start")
        time.sleep(0.1)
    return server


def stellar(cfg: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg), *args],
                   check=True, capture_output=True, timeout=900)


def main() -> int:
    volt, kernel, initrd, size_mib, ops, profile, py_spy, timeout, names = sys.argv[1:10]
    wanted = names.split(",")
    size_mib_i = int(size_mib)
    WORK.mkdir(parents=True, exist_ok=True)
    tmpfs_mib = 3 * size_mib_i + 512
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mib}m", "tmpfs", str(WORK)],
                   check=True)
    k, i = WORK / "kernel", WORK / "initrd"
    shutil.copy(kernel, k)
    shutil.copy(initrd, i)
    pristine, raw = WORK / "pristine.raw", WORK / "disk.raw"
    with open(pristine, "wb") as f:
        for _ in range(size_mib_i):
            f.write(os.urandom(1 << 20))
    cfg = WORK / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    stellar(cfg, "host", "init")
    # the same store, reads not verified: what hashing costs (a), measured apart
    noverify = WORK / "host-noverify.toml"
    noverify.write_text('[store]\npath = "store"\nverify_reads = false\n')
    stellar(cfg, "vol", "import", "bench", str(pristine))
    cmdline = f"{CMDLINE} bench.size={size_mib} bench.ops={ops}"
    volt_args = [volt, "--config", str(cfg), "run", "--kernel", str(k), "--initrd", str(i),
                 "--mem", str(GUEST_MIB),
                 "--cmdline", cmdline + " reboot=k"]
    systems = {
        "qemu-microvm": ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,"
                         "isa-serial=on,acpi=off", "-enable-kvm", "-cpu", "host",
                         "-m", str(GUEST_MIB), "-nodefaults", "-no-user-config", "-nographic",
                         "-serial", "stdio", "-no-reboot",
                         "-global", "virtio-mmio.force-legacy=false",
                         "-drive", f"id=d0,file={raw},format=raw,if=none",
                         "-device", "virtio-blk-device,drive=d0",
                         "-kernel", str(k), "-initrd", str(i),
                         "-append", cmdline + " reboot=t"],
        "volt-blk": [*volt_args, "--device", f"virtio-blk,path={raw}"],
        "volt-stellar": [*volt_args, "--device", "virtio-stellar,volume=run"],
        "volt-vhost": [*volt_args, "--device", f"vhost-user-blk,socket={VHOST_SOCKET}"],
        "volt-unconfined": [*volt_args, "--landlock=off", "--seccomp=off",
                            "--device", "virtio-stellar,volume=run"],
        "volt-stellar-noverify": [volt, "--config", str(noverify), *volt_args[3:],
                                  "--device", "virtio-stellar,volume=run"],
    }
    systems = {name: argv for name, argv in systems.items() if name in wanted}
    out: dict = {"systems": {}, "profiles": {}, "errors": [], "tmpfs_mib": tmpfs_mib}
    runs = [(name, argv, False) for name, argv in systems.items()]
    if profile == "1":
        runs += [(name, systems[name], True) for name in ("volt-stellar", "volt-blk")
                 if name in systems]
    for name, argv, profiled in runs:
        shutil.copy(pristine, raw)
        stellar(cfg, "vol", "clone", "bench", "run")
        spy_out = WORK / "profile.txt" if profiled else None
        print(f"{time.monotonic():10.3f} start {name}{' (py-spy)' if profiled else ''}",
              file=sys.stderr, flush=True)
        server = vhost_server(cfg) if name == "volt-vhost" else None
        lines, rc, err = run_vmm(argv, timeout=float(timeout), profile_out=spy_out,
                                 py_spy=py_spy)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
        stellar(cfg, "vol", "rm", "run")
        if rc != 0:
            out["errors"].append(f"{name}: exit {rc}: {err}")
        if spy_out is None:
            out["systems"][name] = {"lines": lines, "exit": rc}
        else:
            out["profiles"][name] = spy_out.read_text().splitlines() if spy_out.exists() else []
            spy_out.unlink(missing_ok=True)
    raw.unlink()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
