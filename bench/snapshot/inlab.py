"""Runs inside the lab: cold boots and restores of one guest under Volt and QEMU microvm,
timed from L1's wall clock, and the host memory of 8 clones restored from one snapshot.

Usage: inlab.py VOLT KERNEL INITRD RUNS CLONES

Everything lives in L1's tmpfs (/tmp/snapbench): the store (unix sockets cannot live on
the lab's 9p share, and packs on tmpfs share their pages between clones as they would
in a host's page cache), QEMU's migration file, the API and QMP sockets.

The guest's init prints READY and then answers every console line ``ping X`` with
``pong X``. Every console byte is timestamped by a reader thread as it arrives in L1.
One "ping TOKEN" line is written to the VMM's stdin (its serial console) and
``first_response_s`` is the time until ``pong TOKEN`` arrives:

- ``volt-cold`` / ``qemu-cold``: process start of a cold boot; the ping is written when
  READY arrives (before that the guest's UART driver is not set up and would drop it);
  ``ready_s`` is process start to READY.
- ``volt-restore``: ``volt run --snapshot NAME`` (default confinement), process start
  to the pong; the ping is written to its stdin right after the spawn.
- ``volt-restore-api``: a ``volt run --api-sock`` process started beforehand and left
  until it used no CPU for 0.5 s (``settle``: while idle it imports what a VM needs and
  opens the store);
  clock starts when ``PUT /snapshot/load {"resume_vm": true}`` is sent (the ping is
  already in its stdin); ``restore_to_running_s`` ends when the API answers 204
  (the VM is running then), ``first_response_s`` when the pong arrives.
- ``qemu-restore``: ``qemu-system-x86_64 ... -incoming "exec:cat FILE"`` with the file
  QEMU's monitor wrote (``stop``, then ``migrate "exec:cat > FILE"``). QMP
  ``query-status`` is polled every 10 ms from process start; when it leaves
  ``inmigrate`` (``loaded_s``) the VM is ``paused`` (QEMU restores the saved run state,
  and the saved VM was stopped), so ``cont`` is sent at once; ``restore_to_running_s``
  ends when ``query-status`` then says ``running``; ``first_response_s`` at the pong.
  The ping is written right after the spawn and, if no pong came yet, again once QMP
  says running (input that reaches the UART while its state is still being loaded
  would be overwritten by the loaded state).
- ``volt-serve-restore``: a ``volt serve SOCK`` started (and idle) beforehand, once for
  all runs (bench/density's ``Fleet`` starts it); the clock starts when the client
  process is spawned and stops at the pong. The client is not ``volt spawn`` (a Python
  process that imports the volt CLI) but CLIENT below, a few lines of Python run by the
  system's ``/usr/bin/python3 -S -E`` (no site, no environment; in one lab check it
  started a little faster than the project's venv interpreter) that import only
  json/os/signal/socket/sys. It sends serve.py's request,
  ``{"argv": ["--config", HOST.toml, "--snapshot", "snap"]}`` (the argv of
  ``python -m volt.vmm``, whose parser takes ``--config`` itself) with its
  stdin/stdout/stderr attached, forwards SIGTERM to the VM and exits with its code. Its
  interpreter start is inside the figure; ``client_start_s``, taken right before each
  run, is how long the same interpreter takes to start, import those modules and exit.
  The ping is written to the client's stdin (the VM's stdin) right after the spawn.
- ``qemu-restore-deferred``: QEMU's pre-started counterpart of ``volt-restore-api``:
  ``qemu-system-x86_64 ... -incoming defer`` started beforehand, QMP connected, and
  settled as Volt's; the clock starts when QMP ``migrate-incoming {"uri": "exec:cat FILE"}``
  is sent; then as ``qemu-restore``: ``query-status`` polled every 10 ms until it
  leaves ``inmigrate`` (``loaded_s``), ``cont``, ``restore_to_running_s`` when it says
  ``running``, ``first_response_s`` at the pong. The ping is written once QMP says
  running (a ping written before the load would be overwritten by the loaded UART).

Runs are interleaved in the order of ``SYSTEMS``; the first restore from the store is
``volt-restore`` run 0 (the store verifies each mapped chunk once, so later restores may
skip that), so each row's first run is reported beside its median.

If a pong does not come within RESEND_S of the last ping, the ping is sent again, a
safeguard only (the count of pings is kept per run, so a lost line shows; a ping
written while a VMM is still starting waits in its stdin, and a lab run checked that
``volt run --snapshot`` answers the one written at its spawn as soon as its vCPU
runs). Afterwards, untimed, one ``volt run --timing`` cold boot and one restore give
Volt's own setup phases (``*_phases_ms``). Prints one JSON object.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.boot.run import parse_phases  # noqa: E402
from bench.density.inlab import Fleet, fincore_kib, sample  # noqa: E402

WORK = Path("/tmp/snapbench")
READY = b"SNAP-READY"
MEM_MIB = 128
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
TIMEOUT = 240.0
RESEND_S = 30.0
#: The interpreter of the ``volt serve`` client (the system's, else this one).
CLIENT_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
#: The ``volt serve`` client, run as ``python -S -E -c CLIENT SOCK RUN-ARGS...``: serve.py's
#: protocol (one JSON request with stdin/stdout/stderr attached; {"pid"}, then {"exit"}).
CLIENT = """import json, os, signal, socket, sys
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(sys.argv[1])
socket.send_fds(c, [json.dumps({"argv": sys.argv[2:]}).encode()], [0, 1, 2])
r = c.makefile("rb")
pid = json.loads(r.readline())["pid"]
def fwd(sig, frame):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, fwd)
sys.exit(json.loads(r.readline() or b'{"exit": 1}')["exit"])
"""


def _load_and_run(q: Qmp, c: Console) -> tuple[float, float]:
    """Wait for QEMU to load its migration file, then run it (a VM saved stopped loads
    paused); (loaded, running) seconds after ``c.t0``. Closes ``q``."""
    deadline = time.monotonic() + TIMEOUT
    while (status := q.call("query-status").get("status")) == "inmigrate":
        if time.monotonic() > deadline:
            raise RuntimeError("QEMU never finished loading its migration file")
        time.sleep(0.01)
    loaded = time.monotonic() - c.t0
    if status == "paused":
        q.call("cont")
    status = q.call("query-status").get("status")
    running = time.monotonic() - c.t0
    q.close()
    if status != "running":
        raise RuntimeError(f"QEMU is {status!r} after its restore, not running")
    return loaded, running


class Console:
    """A VMM process whose stdout (the guest console) a thread reads and timestamps."""

    def __init__(self, argv: list[str], t0: float | None = None) -> None:
        self.t0 = time.monotonic() if t0 is None else t0
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.buf = bytearray()
        self.stamps: list[tuple[int, float]] = []   # (buffer length after chunk, time)
        self.cond = threading.Condition()
        self.pings = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.err = bytearray()
        self.err_reader = threading.Thread(target=self._read_err, daemon=True)
        self.err_reader.start()

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            now = time.monotonic()
            with self.cond:
                if not chunk:
                    self.stamps.append((-1, now))
                    self.cond.notify_all()
                    return
                self.buf += chunk
                self.stamps.append((len(self.buf), now))
                self.cond.notify_all()

    def _read_err(self) -> None:
        fd = self.proc.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self.err += chunk

    def arrived(self, marker: bytes) -> float | None:
        """When ``marker`` was complete in the output (monotonic), or None."""
        with self.cond:
            pos = self.buf.find(marker)
            if pos < 0:
                return None
            end = pos + len(marker)
            return next(t for n, t in self.stamps if n >= end)

    def wait(self, marker: bytes, timeout: float = TIMEOUT, resend: bytes | None = None) -> float:
        """Seconds from t0 until ``marker`` arrived; with ``resend``, that line is written
        again whenever RESEND_S pass without the marker."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while True:
            t = self.arrived(marker)
            if t is not None:
                return t - self.t0
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"no {marker!r} after {timeout:g}s: {bytes(self.buf[-400:])!r}"
                                   f" stderr {bytes(self.err[-600:])!r}")
            with self.cond:
                if self.stamps and self.stamps[-1][0] == -1:
                    self.proc.wait(timeout=10)
                    raise RuntimeError(f"exited {self.proc.returncode} without {marker!r}: "
                                       f"{bytes(self.buf[-400:])!r} stderr "
                                       f"{bytes(self.err[-600:])!r}")
                self.cond.wait(0.05)
            if resend is not None and time.monotonic() - last > RESEND_S:
                self.send(resend)
                last = time.monotonic()

    def send(self, line: bytes) -> None:
        self.pings += 1
        with contextlib.suppress(OSError):
            self.proc.stdin.write(line)
            self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err_reader.join(10)


# -- Volt's API and QEMU's QMP, over unix sockets ------------------------------------------

class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def api(conn: _Unix, method: str, path: str, body: dict) -> tuple[int, bytes]:
    conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = TIMEOUT) -> socket.socket:
    """A connection to the unix socket ``path`` once ``proc`` listens on it."""
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {path} (exit {proc.poll()})") from None
            time.sleep(0.01)


def settle(pid: int, quiet: float = 0.5, timeout: float = TIMEOUT) -> float:
    """Wait until process ``pid`` has used no CPU for ``quiet`` seconds (at least that
    long): a pre-started VMM that has done its start-up work and now only waits (an idle
    ``volt run --api-sock`` imports and opens its store meanwhile; QEMU has nothing left
    to do once QMP answers). The seconds waited."""
    def cpu() -> int:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])      # utime + stime, in clock ticks

    t0 = time.monotonic()
    last, since = cpu(), t0
    while time.monotonic() - since < quiet:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"process {pid} did not settle in {timeout:.0f} s")
        time.sleep(0.05)
        now = cpu()
        if now != last:
            last, since = now, time.monotonic()
    return time.monotonic() - t0


class Qmp:
    def __init__(self, path: str, proc: subprocess.Popen) -> None:
        self.sock = wait_socket(path, proc)
        self.sock.settimeout(TIMEOUT)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())                # the greeting
        self.call("qmp_capabilities")

    def call(self, cmd: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": cmd, **({"arguments": args} if args else {})})
                     .encode() + b"\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP closed during {cmd}")
            msg = json.loads(line)
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"QMP {cmd}: {msg['error']}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
            self.sock.close()


# -- the systems ---------------------------------------------------------------------------

class Lab:
    def __init__(self, volt: str, kernel: str, initrd: str) -> None:
        self.volt, self.kernel, self.initrd = volt, kernel, initrd
        self.cfg = str(WORK / "host.toml")
        self.mig = str(WORK / "qemu.mig")
        self.server: Fleet | None = None

    def serve_start(self) -> dict[str, Any]:
        """The pre-started ``volt serve`` (bench/density's, on WORK/serve.sock)."""
        t0 = time.monotonic()
        self.server = Fleet(WORK, "volt-serve", MEM_MIB)
        return {"start_s": time.monotonic() - t0, "pid": self.server.server.pid}

    def serve_stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client_argv(self, *run_args: str) -> list[str]:
        assert self.server is not None
        return [CLIENT_PYTHON, "-S", "-E", "-c", CLIENT, self.server.sock,
                "--config", self.cfg, *run_args]

    def volt_argv(self, *args: str) -> list[str]:
        return [self.volt, "--config", self.cfg, "run", *args]

    def boot_args(self) -> list[str]:
        return ["--kernel", self.kernel, "--initrd", self.initrd, "--mem", str(MEM_MIB),
                "--cmdline", CMDLINE]

    def qemu_argv(self, *extra: str) -> list[str]:
        return ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
                "-enable-kvm", "-cpu", "host", "-m", str(MEM_MIB), "-nodefaults",
                "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                "-kernel", self.kernel, "-initrd", self.initrd,
                "-append", CMDLINE.replace("reboot=k", "reboot=t"), *extra]

    # cold boots: ping once READY is there
    def cold(self, argv: list[str], token: str) -> dict[str, float]:
        c = Console(argv)
        try:
            ready = c.wait(READY)
            ping = f"ping {token}\n".encode()
            c.send(ping)
            first = c.wait(f"pong {token}".encode(), resend=ping)
            return {"ready_s": ready, "first_response_s": first, "pings": c.pings}
        finally:
            c.stop()

    def volt_cold(self, token: str) -> dict[str, float]:
        return self.cold(self.volt_argv(*self.boot_args()), token)

    def qemu_cold(self, token: str) -> dict[str, float]:
        return self.cold(self.qemu_argv(), token)

    # snapshots
    def volt_snapshot(self) -> dict[str, Any]:
        sock = str(WORK / "src.sock")
        c = Console(self.volt_argv("--api-sock", sock, "--landlock", "off", "--seccomp", "off",
                                   *self.boot_args()))
        try:
            conn = _Unix(sock)
            wait_socket(sock, c.proc).close()
            status, body = api(conn, "PUT", "/actions", {"action_type": "InstanceStart"})
            if status != 204:
                raise RuntimeError(f"InstanceStart: {status} {body!r}")
            c.wait(READY)
            time.sleep(1)                 # the shell is in its read by now
            t0 = time.monotonic()
            r = subprocess.run([self.volt, "--config", self.cfg, "snapshot", "create", "snap",
                                "--api-sock", sock, "--keep-paused", "--json"],
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"volt snapshot create: {r.stderr[-1500:]}")
            out = json.loads(r.stdout)
            out["create_s"] = time.monotonic() - t0
            return out
        finally:
            c.stop()

    def qemu_snapshot(self) -> dict[str, Any]:
        qsock = str(WORK / "src.qmp")
        c = Console(self.qemu_argv("-qmp", f"unix:{qsock},server=on,wait=off"))
        try:
            c.wait(READY)
            time.sleep(1)
            q = Qmp(qsock, c.proc)
            t0 = time.monotonic()
            q.call("stop")
            q.call("migrate", uri=f"exec:cat > {self.mig}")
            while True:
                st = q.call("query-migrate").get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migrate to file: {st}")
                time.sleep(0.02)
            seconds = time.monotonic() - t0
            with contextlib.suppress(RuntimeError, OSError):
                q.call("quit")
            q.close()
            return {"create_s": seconds, "file_mib": os.path.getsize(self.mig) / 2**20}
        finally:
            c.stop()

    # restores: ping right away
    def volt_restore(self, token: str) -> dict[str, float]:
        c = Console(self.volt_argv("--snapshot", "snap"))
        try:
            ping = f"ping {token}\n".encode()
            c.send(ping)
            return {"first_response_s": c.wait(f"pong {token}".encode(), resend=ping),
                    "pings": c.pings}
        finally:
            c.stop()

    def volt_restore_api(self, token: str) -> dict[str, float]:
        sock = str(WORK / "api.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        c = Console(self.volt_argv("--api-sock", sock))
        try:
            wait_socket(sock, c.proc).close()
            conn = _Unix(sock)
            conn.connect()
            settle(c.proc.pid)            # an idle, pre-started VMM
            ping = f"ping {token}\n".encode()
            c.send(ping)
            c.t0 = t0 = time.monotonic()
            status, body = api(conn, "PUT", "/snapshot/load",
                               {"snapshot_path": "snap", "resume_vm": True})
            running = time.monotonic() - t0
            if status != 204:
                raise RuntimeError(f"PUT /snapshot/load: {status} {body!r}")
            first = c.wait(f"pong {token}".encode(), resend=ping)
            conn.close()
            return {"restore_to_running_s": running, "first_response_s": first,
                    "pings": c.pings}
        finally:
            c.stop()

    def volt_serve_restore(self, token: str) -> dict[str, float]:
        if self.server is None or self.server.server.poll() is not None:
            raise RuntimeError("volt serve is not running")
        t = time.monotonic()
        subprocess.run([CLIENT_PYTHON, "-S", "-E", "-c",
                        "import json, os, signal, socket, sys"], check=True, timeout=TIMEOUT)
        client_start = time.monotonic() - t
        settle(self.server.server.pid)    # the server idle again
        c = Console(self.client_argv("--snapshot", "snap"))
        try:
            ping = f"ping {token}\n".encode()
            c.send(ping)
            return {"first_response_s": c.wait(f"pong {token}".encode(), resend=ping),
                    "client_start_s": client_start, "pings": c.pings}
        finally:
            c.stop()

    def qemu_restore_deferred(self, token: str) -> dict[str, float]:
        qsock = str(WORK / "deferred.qmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qsock)
        c = Console(self.qemu_argv("-qmp", f"unix:{qsock},server=on,wait=off",
                                   "-incoming", "defer"))
        try:
            q = Qmp(qsock, c.proc)
            if (status := q.call("query-status").get("status")) != "inmigrate":
                raise RuntimeError(f"QEMU -incoming defer is {status!r}, not inmigrate")
            settle(c.proc.pid)            # an idle, pre-started VMM
            ping = f"ping {token}\n".encode()
            pong = f"pong {token}".encode()
            c.t0 = time.monotonic()
            q.call("migrate-incoming", uri=f"exec:cat {self.mig}")
            loaded, running = _load_and_run(q, c)
            c.send(ping)
            first = c.wait(pong, resend=ping)
            return {"loaded_s": loaded, "restore_to_running_s": running,
                    "first_response_s": first, "pings": c.pings}
        finally:
            c.stop()

    def qemu_restore(self, token: str) -> dict[str, float]:
        c, fig = self.qemu_restored(token, str(WORK / "dst.qmp"))
        c.stop()
        return fig

    def qemu_restored(self, token: str, qsock: str) -> tuple[Console, dict[str, float]]:
        """A QEMU restored from the migration file, running and answering (see the module
        docstring), and its figures."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qsock)
        c = Console(self.qemu_argv("-qmp", f"unix:{qsock},server=on,wait=off",
                                   "-incoming", f"exec:cat {self.mig}"))
        try:
            ping = f"ping {token}\n".encode()
            pong = f"pong {token}".encode()
            c.send(ping)
            q = Qmp(qsock, c.proc)
            loaded, running = _load_and_run(q, c)
            if c.arrived(pong) is None:
                c.send(ping)
            first = c.wait(pong, resend=ping)
        except BaseException:
            c.stop()
            raise
        return c, {"loaded_s": loaded, "restore_to_running_s": running,
                   "first_response_s": first, "pings": c.pings}

    def volt_phases(self, args: list[str], token: str, serve: bool = False) -> dict[str, float]:
        """Not a timed run: where ``volt run --timing ARGS`` spends its setup (process
        start to first KVM_RUN, by phase; the VMM's own report, from L1's clock); with
        ``serve``, a VM of the pre-started ``volt serve`` (its clock restarts at the fork)."""
        c = Console(self.client_argv(*args, "--timing") if serve
                    else self.volt_argv(*args, "--timing"))
        try:
            ping = f"ping {token}\n".encode()
            c.send(ping)
            c.wait(f"pong {token}".encode(), resend=ping)
        finally:
            c.stop()
        return parse_phases(c.err.decode(errors="replace"))

    # clones
    def clones(self, n: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        packs = sorted((WORK / "store").rglob("pack-*.dat"))
        for system in ("volt", "qemu"):
            fleet: list[Console] = []
            try:
                for k in range(n):
                    if system == "qemu":
                        fleet.append(self.qemu_restored(f"clone{k}",
                                                        str(WORK / f"clone{k}.qmp"))[0])
                        continue
                    c = Console(self.volt_argv("--snapshot", "snap"))
                    fleet.append(c)
                    ping = f"ping clone{k}\n".encode()
                    c.send(ping)
                    c.wait(f"pong clone{k}".encode(), resend=ping)
                time.sleep(3)
                files = packs if system == "volt" else []
                s = sample([c.proc.pid for c in fleet], MEM_MIB, files)
                s["total_mib"] = s["pss_mib"] + s["cache_mib"]
                s["packs_resident_mib"] = sum(fincore_kib(p) for p in packs) / 1024
                s["migration_file_cache_mib"] = fincore_kib(Path(self.mig)) / 1024
                out[system] = s
            finally:
                for c in fleet:
                    c.stop()
        return out


def main() -> int:
    volt, kernel, initrd, runs, clones = sys.argv[1], sys.argv[2], sys.argv[3], \
        int(sys.argv[4]), int(sys.argv[5])
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    (WORK / "host.toml").write_text(f'[store]\npath = "{WORK / "store"}"\n')
    subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(WORK / "host.toml"),
                    "host", "init"], check=True, capture_output=True, timeout=300)
    lab = Lab(volt, kernel, initrd)
    out: dict[str, Any] = {"errors": []}

    def attempt(key: str, fn: Any, *args: Any) -> Any:
        t = time.monotonic()
        try:
            res = fn(*args)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            out["errors"].append(f"{key}: {exc}")
            res = None
        print(f"snapshot-bench: {key} {res} ({time.monotonic() - t:.1f}s)", file=sys.stderr,
              flush=True)
        return res

    out["volt_snapshot"] = attempt("volt snapshot", lab.volt_snapshot)
    out["qemu_snapshot"] = attempt("qemu snapshot", lab.qemu_snapshot)
    systems = {"volt-cold": lab.volt_cold, "qemu-cold": lab.qemu_cold,
               "volt-restore": lab.volt_restore, "volt-restore-api": lab.volt_restore_api,
               "volt-serve-restore": lab.volt_serve_restore,
               "qemu-restore": lab.qemu_restore,
               "qemu-restore-deferred": lab.qemu_restore_deferred}
    out["order"] = list(systems)
    for name in systems:
        out[name] = []
    if out["volt_snapshot"] is not None:
        out["volt_serve"] = attempt("volt serve start", lab.serve_start)
    try:
        for i in range(runs):            # interleaved, so background load hits all alike
            for name, fn in systems.items():
                if name.startswith(("volt-restore", "volt-serve")) \
                        and out["volt_snapshot"] is None:
                    continue
                if name == "volt-serve-restore" and lab.server is None:
                    continue
                if name.startswith("qemu-restore") and out["qemu_snapshot"] is None:
                    continue
                res = attempt(f"{name} run {i}", fn, f"{name}-{i}")
                if res is not None:
                    out[name].append(res)
        if out["volt_snapshot"] is not None:
            out["volt_restore_phases_ms"] = attempt(
                "volt run --snapshot --timing", lab.volt_phases, ["--snapshot", "snap"], "t1")
            if lab.server is not None:
                out["volt_serve_restore_phases_ms"] = attempt(
                    "volt serve VM --snapshot --timing", lab.volt_phases,
                    ["--snapshot", "snap"], "t3", True)
    finally:
        lab.serve_stop()
    out["volt_cold_phases_ms"] = attempt("volt run --timing", lab.volt_phases,
                                         lab.boot_args(), "t2")
    if clones and out["volt_snapshot"] is not None and out["qemu_snapshot"] is not None:
        out["clones"] = attempt(f"{clones} clones", lab.clones, clones)
    out["clones_n"] = clones
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
