"""Snapshot benchmark: restore of a Linux guest under Volt vs QEMU microvm, in one lab run.

Inside the lab (inlab.py; nested KVM under TCG: emulated timings, only ratios to the peer
of the same run mean anything), the project's minimal guest kernel with a busybox
initramfs whose init prints READY and answers each console line ``ping X`` with ``pong X``,
128 MiB, 1 vCPU, timed from L1's wall clock (every console byte stamped as it arrives):

- ``volt-cold`` / ``qemu-cold``: cold boot, process start to READY (``ready_s``) and to
  the pong of a ping written once READY arrived (``first_response_s``);
- ``volt-restore``: ``first_response_s`` is ``volt run --snapshot NAME`` from process
  start to the pong of a ping written to its stdin right after the spawn (the whole
  restore, interpreter start included); ``restore_to_running_s`` is taken from the
  API: ``PUT /snapshot/load {"resume_vm": true}`` sent to a pre-started, idle
  ``volt run --api-sock`` process until its 204 (the VM runs then; the process itself
  prints nothing when it runs a restored VM);
- ``volt-restore-api``: that pre-started process alone: PUT sent to 204
  (``restore_to_running_s``) and to the pong (``first_response_s``);
- ``qemu-restore`` (the peer): ``-incoming "exec:cat FILE"`` from a file written by QEMU's
  own migration (QMP ``stop``, ``migrate "exec:cat > FILE"``), process start to QMP
  ``query-status`` saying ``running`` (polled every 10 ms; the file restores the VM
  paused, as it was saved, so ``cont`` is sent the moment loading ends:
  ``restore_to_running_s``) and to the pong (``first_response_s``); the ping is written
  right after the spawn and again at ``running`` if no pong came yet;
- ``volt-serve-restore``: a ``volt serve SOCK`` started (and idle) beforehand, once for
  all runs; ``first_response_s`` runs from spawning its client, which asks for ``--config
  HOST.toml --snapshot NAME``, to the pong. The client is not ``volt spawn`` but a
  few lines of Python speaking volt serve's protocol, run as ``/usr/bin/python3 -S -E``
  importing only json/os/signal/socket/sys (inlab.py's CLIENT); its interpreter start is inside
  the figure, and ``client_start_s`` is how long that interpreter takes to start,
  import those modules and exit, measured before each run;
- ``qemu-restore-deferred`` (the peer of the pre-started rows): ``qemu -incoming defer``
  started (and idle, QMP connected) beforehand; QMP ``migrate-incoming "exec:cat FILE"``
  sent to ``running`` after ``cont`` (``restore_to_running_s``) and to the pong
  (``first_response_s``; the ping is written at ``running``);
- ``clones8_mib``: 8 VMs restored from one snapshot, all answering: Volt's summed PSS of
  the 8 VMM processes plus the page cache of the snapshot's packs not mapped by them
  (bench/density's sampling), against QEMU's summed PSS of 8 restores of its file.

Each timed figure is the median of ``--runs`` interleaved runs; each restore row's
first run is also given (``first_run_response_s``; ``runs_s`` in the JSON lists every
run in order): volt-restore run 0 is the store's first restore, and the store verifies
each mapped chunk once, so later restores may skip that. In the lab Python's own start
takes seconds, so the whole-process rows mostly compare interpreter start; the
pre-started rows compare the restore itself. Goal (issue 16): Volt restores faster than
QEMU, in either comparison: whole process (``first_response_s`` of volt-restore below
qemu-restore's) or pre-started (the better of volt-restore-api and volt-serve-restore
below qemu-restore-deferred's); ``goal_comparison`` names the one(s) met.

On this bare machine (its /dev/kvm cannot run Linux), ``volt-restore-host``: the host-side
part of a restore, a 128 MiB VM whose RAM holds 24 MiB of random data (captured from a
tiny real-mode guest built in-process with volt.snapshot.machine.capture), restored by
``PUT /snapshot/load {"resume_vm": true}`` in a pre-started, confined VMM waiting on its
API, settled (no CPU used for 0.5 s: an idle VMM imports what a VM needs and opens the
store): request sent to 204 (``host_restore_ms``; packs in the page cache). The goal,
under the seed's 50 ms, is for a ``volt serve`` child (its code loaded once by the
server, shared by every child); ``volt-restore-host-api`` is a plain ``volt run
--api-sock``, which loads it itself while idle.

Usage: python bench/snapshot/run.py [--runs 3] [--clones 8] [--no-lab]
(``--clones 0`` skips the clones.)
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from volt import lab
from volt.kernels.build import build
from volt.kernels.initramfs import base_archive

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))     # bench.* (the volt serve client in inlab.py)
VOLT = str(Path(sys.executable).with_name("volt"))
PEER = "qemu-restore"
PEER_PRESTARTED = "qemu-restore-deferred"
PRESTARTED = ("volt-restore-api", "volt-serve-restore")
ROWS = ("volt-cold", "qemu-cold", "volt-restore", "volt-restore-api", "volt-serve-restore",
        PEER, PEER_PRESTARTED)
RESTORE_ROWS = ROWS[2:]
HOST_GOAL_MS = 50.0
HOST_MEM_MIB, HOST_DATA_MIB = 128, 24
#: The guest's init: READY, then answer each console line "ping X" with "pong X".
INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
echo SNAP-READY
while read cmd arg; do echo "pong $arg"; done
"""
#: Real mode at 0x1000: mov dx,0x3f8; 1: inc word [0x2000]; mov al,[0x2000]; out dx,al;
#: jmp 1b (a counter on the serial port, as in the project's snapshot tests)
COUNT_FOREVER = bytes.fromhex("baf803" "ff060020" "a00020" "ee" "ebf6")
CODE_ADDR = 0x1000


def compile_bytecode() -> None:
    """As bench/boot does: byte-compile the project so no VMM start compiles over 9p."""
    import compileall

    root = HERE.parents[1]
    for d in [root / "stellarium_core", *sorted((root / "plugins").glob("*/*/"))]:
        compileall.compile_dir(str(d), quiet=1)


def in_lab(kernel: Path, initrd: Path, runs: int, clones: int) -> dict:
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    res = lab.run([sys.executable, str(HERE / "inlab.py"), VOLT, str(kernel), str(initrd),
                   str(runs), str(clones)], timeout=900 + 200 * runs + 60 * clones, env=env,
                  memory_mib=2048 + clones * 2 * 160)
    for line in res.stderr.splitlines():
        if line.startswith("snapshot-bench:"):
            print(line, file=sys.stderr)
    res.check()
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the host-side restore, on this machine ------------------------------------------------

def host_snapshot(cfg: Path) -> dict[str, Any]:
    """Snapshot ``host`` of a never-run tiny guest with 128 MiB of RAM, 24 MiB of it random."""
    from volt.snapshot.machine import capture
    from volt.vmm import cpu, kvm
    from volt.vmm.config import VmConfig
    from volt.vmm.vm import Machine

    from stellarium_core.host import Host

    host = Host.from_config(cfg)
    m = Machine(HOST_MEM_MIB << 20)
    try:
        m.add_legacy_devices(lambda b: None)
        m.mem.write(CODE_ADDR, COUNT_FOREVER)
        data = os.urandom(HOST_DATA_MIB << 20)
        m.mem.write(32 << 20, data)
        v = m.vcpus[0].fd
        cpu.configure_vcpu(v, cpu.normalize_cpuid(m.kvm.supported_cpuid(), 0, 1, None, False))
        s = v.get_sregs()
        s.cs.base, s.cs.selector = 0, 0
        v.set_sregs(s)
        v.set_regs(kvm.Regs(rip=CODE_ADDR, rflags=0x2))
        snap = capture(m, host, "host", VmConfig(memory_mib=HOST_MEM_MIB))
    finally:
        m.close()
    stored = sum(p.length for p in snap.manifest.pieces)
    return {"stored_mib": stored / 2**20, "pieces": len(snap.manifest.pieces)}


def _http(sock: socket.socket, method: str, path: str, body: dict) -> tuple[int, float]:
    """One request on a connected socket: (status, seconds from send to the status line)."""
    data = json.dumps(body).encode()
    req = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
           f"\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
    t0 = time.perf_counter()
    sock.sendall(req)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    seconds = time.perf_counter() - t0
    return int(buf.split()[1]) if buf.startswith(b"HTTP/") else 0, seconds


def host_restore(runs: int) -> dict[str, Any]:
    """``PUT /snapshot/load`` (sent -> 204), ``runs`` times, each in a new, settled VMM
    process waiting on its API (confined: the default): ``ms`` in a ``volt serve`` child,
    ``api_ms`` in a plain ``volt run --api-sock``."""
    from bench.snapshot.inlab import CLIENT, CLIENT_PYTHON

    out: dict[str, Any] = {"ms": [], "api_ms": [], "errors": []}
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        cfg = Path(tmp) / "host.toml"
        cfg.write_text('[store]\npath = "store"\n')
        subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg), "host",
                        "init"], check=True, capture_output=True, timeout=120)
        out.update(host_snapshot(cfg))
        sock_path, serve_sock = str(Path(tmp) / "api.sock"), str(Path(tmp) / "serve.sock")
        server = subprocess.Popen([VOLT, "serve", serve_sock], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _connect(serve_sock, server).close()
            api = ["--config", str(cfg), "--api-sock", sock_path, "--serial", "none"]
            for _ in range(runs):
                for key, argv, vmm in (
                        ("ms", [CLIENT_PYTHON, "-S", "-E", "-c", CLIENT, serve_sock, *api],
                         lambda _client: _child_of(server.pid)),
                        ("api_ms", [VOLT, "--config", str(cfg), "run", *api[2:]],
                         lambda proc: proc.pid)):
                    _time_load(argv, sock_path, out, key, vmm)
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=60)
    return out


def _child_of(pid: int) -> int:
    """The one child of process ``pid`` (a volt serve server's VMM)."""
    kids = [k for t in Path(f"/proc/{pid}/task").iterdir()
            for k in (t / "children").read_text().split()]
    if len(kids) != 1:
        raise RuntimeError(f"volt serve has {len(kids)} children, not one")
    return int(kids[0])


def _time_load(argv: list[str], sock_path: str, out: dict[str, Any], key: str,
               vmm: Callable[[subprocess.Popen], int]) -> None:
    """Start ``argv`` (a VMM, pid ``vmm(process)``, serving its API on ``sock_path``),
    let it settle, time one ``PUT /snapshot/load`` into ``out[key]``, stop it."""
    from bench.snapshot.inlab import settle

    status = 0
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        s = _connect(sock_path, proc)
        settle(vmm(proc))                 # pre-started and idle
        status, seconds = _http(s, "PUT", "/snapshot/load",
                                {"snapshot_path": "host", "resume_vm": True})
        s.close()
        if status == 204:
            out[key].append(round(1000 * seconds, 2))
        else:
            out["errors"].append(f"{key}: PUT /snapshot/load answered {status}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if os.path.exists(sock_path):
            os.unlink(sock_path)
    if status != 204:
        out["errors"].append(err.decode(errors="replace")[-800:])


def _connect(path: str, proc: subprocess.Popen) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            s.settimeout(60)
            return s
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"volt run --api-sock did not serve (exit {proc.poll()}): "
                                   f"{proc.stderr.read().decode(errors='replace')[-800:]}")\
                    from None
            time.sleep(0.005)


# -- the report ----------------------------------------------------------------------------

def med(runs: list[dict], key: str) -> float | None:
    xs = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(xs), 3) if xs else None


def systems_of(fig: dict | None, host: dict) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    if fig is not None:
        api = fig.get("volt-restore-api", [])
        out["volt-cold"] = {"ready_s": med(fig["volt-cold"], "ready_s"),
                            "first_response_s": med(fig["volt-cold"], "first_response_s")}
        out["volt-restore"] = {"restore_to_running_s": med(api, "restore_to_running_s"),
                               "first_response_s": med(fig["volt-restore"], "first_response_s")}
        out["volt-restore-api"] = {"restore_to_running_s": med(api, "restore_to_running_s"),
                                   "first_response_s": med(api, "first_response_s")}
        out["qemu-cold"] = {"ready_s": med(fig["qemu-cold"], "ready_s"),
                            "first_response_s": med(fig["qemu-cold"], "first_response_s")}
        serve = fig.get("volt-serve-restore", [])
        out["volt-serve-restore"] = {"first_response_s": med(serve, "first_response_s"),
                                     "client_start_s": med(serve, "client_start_s")}
        for name in (PEER, PEER_PRESTARTED):
            out[name] = {"restore_to_running_s": med(fig.get(name, []),
                                                     "restore_to_running_s"),
                         "first_response_s": med(fig.get(name, []), "first_response_s")}
        for name in RESTORE_ROWS:
            rs = fig.get(name, [])
            out[name]["first_run_response_s"] = \
                round(rs[0]["first_response_s"], 3) if rs else None
        clones = fig.get("clones") or {}
        for system, key in (("volt-restore", "volt"), (PEER, "qemu")):
            if key in clones:
                c = clones[key]
                out[system]["clones8_mib"] = round(c["pss_mib"] + (c["cache_mib"]
                                                                  if key == "volt" else 0), 1)
    for system, key in (("volt-restore-host", "ms"), ("volt-restore-host-api", "api_ms")):
        ms = host[key]
        out[system] = {"host_restore_ms": round(statistics.median(ms), 2) if ms else None}
    return out


def _cell(v: float | None) -> str:
    return f"{v:>9.3f}" if v is not None else f"{'-':>9}"


def runs_of(fig: dict | None) -> dict[str, dict[str, list[float]]]:
    """Every run's figures, in run order (the first is the first restore of its row)."""
    out: dict[str, dict[str, list[float]]] = {}
    for name in ROWS if fig else ():
        rs = fig.get(name, [])
        keys = [k for k in ("ready_s", "restore_to_running_s", "first_response_s",
                            "client_start_s") if any(k in r for r in rs)]
        out[name] = {k: [round(r[k], 3) for r in rs if k in r] for k in keys}
    return out


def goals(systems: dict) -> dict[str, Any]:
    """Both comparisons of issue 16's goal: whole process and pre-started."""
    def fr(name: str) -> float | None:
        return systems.get(name, {}).get("first_response_s")

    whole = (fr("volt-restore"), fr(PEER))
    pre = [(fr(n), n) for n in PRESTARTED if fr(n) is not None]
    best, best_name = min(pre) if pre else (None, None)
    out: dict[str, Any] = {
        "whole_process": {"volt": "volt-restore", "volt_s": whole[0], "peer": PEER,
                          "peer_s": whole[1]},
        "pre_started": {"volt": best_name, "volt_s": best, "peer": PEER_PRESTARTED,
                        "peer_s": fr(PEER_PRESTARTED)}}
    met = []
    for key, c in out.items():
        c["met"] = c["volt_s"] is not None and c["peer_s"] is not None \
            and c["volt_s"] < c["peer_s"]
        if c["met"]:
            met.append(key)
    out["met"] = met
    return out


def report(fig: dict | None, host: dict, runs: int, load: tuple) -> None:
    systems = systems_of(fig, host)
    g = goals(systems)
    print(f"bench/snapshot: guest 128 MiB, 1 vCPU; {runs} interleaved runs per system in one "
          f"lab run (L1 wall clock; medians); host load before {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")
    if fig is not None:
        vs, qs = fig.get("volt_snapshot") or {}, fig.get("qemu_snapshot") or {}
        print(f"  snapshot taken: volt {vs.get('create_s', 0):.2f} s "
              f"(stored {vs.get('stored_mib', '?')} MiB), qemu migrate to file "
              f"{qs.get('create_s', 0):.2f} s ({qs.get('file_mib', 0):.1f} MiB file)")
        if fig.get("volt_serve"):
            print(f"  volt serve pre-started in {fig['volt_serve']['start_s']:.2f} s (untimed)")
        print(f"  {'system':<22}{'ready_s':>9}{'running_s':>11}{'response_s':>12}"
              f"{'first run':>11}  runs in order (first_response_s; pings sent)")
        for name in ROWS:
            f = systems[name]
            print(f"  {name:<22}{_cell(f.get('ready_s'))}  {_cell(f.get('restore_to_running_s'))}"
                  f"  {_cell(f.get('first_response_s'))}  {_cell(f.get('first_run_response_s'))}"
                  f"  {[(round(r['first_response_s'], 3), r['pings']) for r in fig.get(name, [])]}")
        cs = [round(r["client_start_s"], 3) for r in fig.get("volt-serve-restore", [])]
        if cs:
            print(f"  volt-serve-restore's client (python3 -S -E, imports only) starts and exits "
                  f"alone in {cs} s (inside its response_s)")
        clones = fig.get("clones") or {}
        for key, label in (("volt", "volt-restore"), ("qemu", PEER)):
            if key in clones:
                c = clones[key]
                print(f"  {fig['clones_n']} clones, {label:<13}: PSS {c['pss_mib']:.1f} MiB, "
                      f"packs' cache not mapped {c['cache_mib']:.1f} MiB, guest private "
                      f"{c['guest_private_mib']:.1f} MiB, L1 used {c['used_mib']:.0f} MiB, "
                      f"migration file cached {c['migration_file_cache_mib']:.1f} MiB"
                      f" -> clones8_mib {systems[label].get('clones8_mib')}")
        for key, label in (("volt_cold_phases_ms", "volt run (cold)"),
                           ("volt_restore_phases_ms", "volt run --snapshot"),
                           ("volt_serve_restore_phases_ms", "volt serve VM --snapshot")):
            if fig.get(key):
                print(f"  {label}, one untimed run with --timing, setup phases (ms): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in fig[key].items()))
        for e in fig.get("errors", []):
            print(f"  error: {e}")
        for key, label in (("whole_process", "whole process"), ("pre_started", "pre-started")):
            c = g[key]
            if c["volt_s"] is not None and c["peer_s"] is not None:
                print(f"goal ({label}): {c['volt']} first response before {c['peer']}'s: "
                      f"{c['volt_s']:.3f} s vs {c['peer_s']:.3f} s: "
                      + ("met" if c["met"] else "NOT met"))
            else:
                print(f"goal ({label}): {c['volt']} vs {c['peer']}: no figure")
        print("goal (either comparison): " + (f"met ({', '.join(g['met'])})" if g["met"]
                                               else "NOT met"))
    for system, key, how in (("volt-restore-host", "ms", "a volt serve child"),
                             ("volt-restore-host-api", "api_ms", "a volt run --api-sock")):
        ms = host[key]
        if ms:
            m = statistics.median(ms)
            print(f"bare machine, {system}: PUT /snapshot/load -> 204 in {how} of a "
                  f"{HOST_MEM_MIB} MiB VM ({host['stored_mib']:.1f} MiB stored in "
                  f"{host['pieces']} pieces), median {m:.2f} ms, runs {ms}" +
                  (f"; goal < {HOST_GOAL_MS:g} ms: " + ("met" if m < HOST_GOAL_MS
                                                        else "NOT met")
                   if system == "volt-restore-host" else ""))
    for e in host["errors"]:
        print(f"  host error: {e}")
    hm = systems["volt-restore-host"]["host_restore_ms"]
    print(json.dumps({
        "bench": "snapshot", "peer": PEER, "systems": systems,
        "higher_is_better": {"ready_s": False, "restore_to_running_s": False,
                             "first_response_s": False, "first_run_response_s": False,
                             "client_start_s": False, "clones8_mib": False,
                             "host_restore_ms": False},
        "goal": "first_response_s: volt-restore < qemu-restore (whole process) or the "
                "better of volt-restore-api, volt-serve-restore < qemu-restore-deferred "
                f"(pre-started); volt-restore-host host_restore_ms < {HOST_GOAL_MS:g}",
        "goal_met": bool(g["met"]),
        "goal_comparison": "+".join(g["met"]) or None,
        "goal_comparisons": {k: g[k] for k in ("whole_process", "pre_started")},
        "host_goal_ms": HOST_GOAL_MS,
        "host_goal_met": hm is not None and hm < HOST_GOAL_MS,
        "runs": runs, "clones": fig.get("clones_n") if fig else None,
        "run_order": (fig or {}).get("order"),
        "runs_s": runs_of(fig),
        "host_load": [round(x, 2) for x in load],
        "volt_setup_phases_ms": {k: (fig or {}).get(f"volt_{k}_phases_ms")
                                 for k in ("cold", "restore", "serve_restore")},
        "errors": (fig or {}).get("errors", []) + host["errors"]}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per system (median)")
    ap.add_argument("--clones", type=int, default=8, help="VMs restored at once per VMM")
    ap.add_argument("--no-lab", action="store_true", help="only the bare-machine figure")
    args = ap.parse_args()
    load = os.getloadavg()
    host = host_restore(args.runs)
    fig = None
    if not args.no_lab:
        kb = build()
        compile_bytecode()
        # not /tmp: the lab's L1 has its own tmpfs there
        with tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir="/var/tmp") as tmp:
            initrd = base_archive(INIT).write(Path(tmp) / "pong.cpio")
            fig = in_lab(kb.bzimage, initrd, args.runs, args.clones)
    report(fig, host, args.runs, load)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
