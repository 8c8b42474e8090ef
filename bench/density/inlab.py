"""Runs inside the lab: boot N VMs of one system, one after another, each reading the same
files of one Debian base, and after each is done reading measure what the host holds.

Usage: inlab.py WORKDIR SYSTEMS N MEM_MIB. WORKDIR (copied into L1's memory by run.py)
holds ``host.toml`` + ``store`` (volume ``base``, imported mappable, and a clone per
VM), ``base.ext4`` (the same disk as a raw file), the kernel and ``init.cpio``.

After VM k has printed its READY marker (it has read its files) and the host has been
quiet for a moment, one sample is taken:

- ``pss_mib``: summed PSS of every VMM process (for ``volt serve``, the server too): what
  the VMMs cost, each shared page split among the processes that map it;
- ``cache_mib``: page cache of the data files (base image, overlays, NEBULA packs, the
  PHOTON hot tier) not already counted as mapped by a VMM (``fincore`` minus the mapped
  share); the data lives in L1's tmpfs, so this is mostly a constant;
- ``guest_private_mib``: the private pages of the guests' RAM mappings (what each guest
  itself dirtied or read into its own memory; KSM turns merged ones into shared pages),
  and ``newest_guest_private_mib``, those of the VM just started;
- ``used_mib``: L1's MemTotal - MemAvailable, a cross-check over everything.

Prints one JSON object: {system: [{"vms": k, ...sample}, ...], "errors": [...]}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READY = b"DENSITY-READY"
CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
#: Every system reads the same files; a VM gets this long to boot and read them.
BOOT_TIMEOUT = 900
KSM = Path("/sys/kernel/mm/ksm")


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def smaps(pid: int) -> list[dict[str, Any]]:
    """Each mapping of ``pid``: its range, name and the kB fields smaps gives."""
    maps: list[dict[str, Any]] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+$", head[0]):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            maps.append({"size": hi - lo, "name": head[5] if len(head) > 5 else ""})
        elif head[0].endswith(":") and len(head) == 3 and head[2] == "kB":
            maps[-1][head[0][:-1]] = int(head[1])
    return maps


def sample(pids: list[int], mem_mib: int, files: list[Path]) -> dict[str, Any]:
    """One measurement over the VMM processes ``pids`` (see the module docstring), and
    the largest private mappings of the newest one outside guest RAM (where it goes)."""
    pss = private = newest = 0
    mapped: dict[str, int] = {}
    guest = mem_mib << 20
    breakdown: dict[str, int] = {}
    for i, pid in enumerate(pids):
        for m in smaps(pid):
            pss += m.get("Pss", 0)
            own = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
            if guest <= m["size"] <= guest + (4 << 20):       # the guest's RAM
                private += own
                newest = own if i == len(pids) - 1 else newest
            elif i == len(pids) - 1 and own:                   # the newest VMM's own pages
                key = m["name"] or f"[anon {m['size'] >> 20} MiB]"
                breakdown[key] = breakdown.get(key, 0) + own
            if m["name"].startswith("/"):    # mapped by several: at least the largest share
                mapped[m["name"]] = max(mapped.get(m["name"], 0), m.get("Rss", 0))
    cached = sum(max(0, fincore_kib(f) - mapped.get(str(f), 0)) for f in files)
    info = meminfo()
    top = sorted(breakdown.items(), key=lambda kv: -kv[1])[:8]
    return {"pss_mib": pss / 1024, "cache_mib": cached / 1024,
            "guest_private_mib": private / 1024, "newest_guest_private_mib": newest / 1024,
            "used_mib": (info["MemTotal"] - info["MemAvailable"]) / 1024,
            "newest_vmm_private_kib": dict(top)}


def fincore_kib(path: Path) -> int:
    """Resident KiB of ``path``'s pages (util-linux fincore)."""
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                       capture_output=True, text=True)
    return int(r.stdout.split()[0]) // 1024 if r.returncode == 0 and r.stdout.split() else 0


def data_files(work: Path) -> list[Path]:
    """Every file a guest's data can come from."""
    files = [work / "base.ext4", *sorted(work.glob("vm*.qcow2"))]
    files += sorted((work / "store").rglob("pack-*.dat"))
    files += [p for d in hot_dirs() for p in d.rglob("*") if p.is_file()]
    return [f for f in files if f.exists()]


def hot_dirs() -> list[Path]:
    """PHOTON's host-wide hot tiers (``shm``): decompressed chunks virtio-stellar reads."""
    return sorted(Path("/dev/shm").glob("stellarium-*"))


class Fleet:
    """The VMs of one system, started one by one; their console goes to files."""

    def __init__(self, work: Path, system: str, mem_mib: int) -> None:
        self.work, self.system, self.mem = work, system, mem_mib
        self.procs: list[subprocess.Popen] = []
        self.consoles: list[Path] = []
        self.server: subprocess.Popen | None = None
        self.sock = str(work / "serve.sock")
        volt = str(Path(sys.executable).with_name("volt"))
        self.volt = volt
        if system.startswith("volt-serve"):
            self.server = subprocess.Popen([volt, "serve", self.sock],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 300
            while not os.path.exists(self.sock):
                if self.server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("volt serve did not start")
                time.sleep(0.2)

    def argv(self, k: int) -> list[str]:
        w, mem = self.work, str(self.mem)
        kernel, initrd = str(w / "bzImage"), str(w / "init.cpio")
        if self.system == "qemu-microvm":
            return ["qemu-system-x86_64", "-M",
                    "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
                    "-enable-kvm", "-cpu", "host", "-m", mem, "-nodefaults",
                    "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                    "-kernel", kernel, "-initrd", initrd,
                    "-global", "virtio-mmio.force-legacy=false",
                    "-drive", f"file={w}/vm{k}.qcow2,format=qcow2,if=none,id=d0",
                    "-device", "virtio-blk-device,drive=d0",
                    "-append", CMDLINE.replace("reboot=k", "reboot=t") + " density.root=vda"]
        dax = self.system != "volt-stellar"
        device = "virtio-pmem,volume=base" if dax else f"virtio-stellar,volume=vm{k}"
        args = ["--kernel", kernel, "--initrd", initrd, "--mem", mem, "--device", device,
                "--cmdline", CMDLINE + (" density.root=pmem0" if dax else " density.root=vda"),
                "--landlock=off"]        # the store is in L1's tmpfs; seccomp stays on
        if self.system in ("volt-pmem-ksm", "volt-serve"):
            args.append("--ksm")
        host = ["--config", str(w / "host.toml")]
        if self.server is not None:
            return [self.volt, "spawn", self.sock, "--", *host, *args]
        return [self.volt, *host, "run", *args]

    def start(self, k: int) -> None:
        console = self.work / f"{self.system}-{k}.console"
        with open(console, "wb") as out:
            self.procs.append(subprocess.Popen(self.argv(k), stdout=out,
                                               stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL))
        self.consoles.append(console)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY not in console.read_bytes():
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"{self.system} VM {k} ended: "
                                   f"{console.read_bytes()[-600:]!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.system} VM {k}: no READY after {BOOT_TIMEOUT}s: "
                                   f"{console.read_bytes()[-600:]!r}")
            time.sleep(0.5)

    def vmm_pids(self) -> list[int]:
        """The processes holding guest memory: QEMU, volt run, or volt serve and its
        children (a ``volt spawn`` client holds none)."""
        if self.server is None:
            return [p.pid for p in self.procs]
        kids = Path(f"/proc/{self.server.pid}/task/{self.server.pid}/children")
        return [self.server.pid, *sorted(map(int, kids.read_text().split()))]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.server is not None:
            self.server.terminate()
            self.server.wait(timeout=60)


def settle_ksm(seconds: float) -> None:
    """Let ksmd merge until the count of shared pages stops growing (or ``seconds``)."""
    deadline, last = time.monotonic() + seconds, -1
    while time.monotonic() < deadline:
        time.sleep(5)
        now = int((KSM / "pages_sharing").read_text())
        if now == last:
            return
        last = now


def main() -> int:
    work, systems, n, mem = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), \
        int(sys.argv[4])
    if KSM.exists():
        (KSM / "pages_to_scan").write_text("5000\n")
        (KSM / "sleep_millisecs").write_text("20\n")
    out: dict[str, Any] = {"errors": []}
    for system in systems:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        for d in hot_dirs():               # each system starts with a cold hot tier
            shutil.rmtree(d, ignore_errors=True)
        ksm = system in ("volt-pmem-ksm", "volt-serve")
        if KSM.exists():
            (KSM / "run").write_text("1\n" if ksm else "2\n")   # 2: unmerge everything
        out[system] = []
        fleet = None
        try:
            fleet = Fleet(work, system, mem)
            for k in range(n):
                fleet.start(k)
                time.sleep(2)
                if ksm:
                    settle_ksm(120)
                s = sample(fleet.vmm_pids(), mem, data_files(work))
                out[system].append({"vms": k + 1, **s})
                print(f"density: {system} {k + 1} VMs {s}", file=sys.stderr, flush=True)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            out["errors"].append(f"{system}: {exc}")
        finally:
            if fleet is not None:
                fleet.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
