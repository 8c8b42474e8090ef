"""The nested KVM lab: run a command where /dev/kvm is real.

This machine's own /dev/kvm cannot run Linux, but QEMU's TCG emulates AMD SVM
with nested paging, so Debian's kvm_amd inside a TCG guest (L1) gives a working
/dev/kvm. :func:`run` boots that guest with the host's / visible read-only
(beneath a throwaway tmpfs overlay), runs one command in a chroot there and
returns its exit code, stdout and stderr. Each run gets its own I/O directory,
mounted writable inside the guest at the same path, so parallel runs never
collide and the command can leave files for the host there.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stellarium_core.errors import StellarError, UsageError
from volt.lab.image import MARK_FAIL, MARK_READY, LabImage, ensure_image

QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1
#: A command still running this many seconds before its timeout gets the watchdog's dump.
WATCHDOG_LEAD = 60.0
#: L1 beats every 5 s (its /init); this long without a beat means L1 itself has wedged.
WEDGE_AFTER = 120.0
#: How often the host looks at the heartbeat while QEMU runs.
HEARTBEAT_POLL = 2.0
#: Per-run directories (command script, outputs, console log); ``keep=True`` leaves them.
RUNS_ROOT = Path(os.environ.get("VOLT_LAB_RUNS", "/var/tmp/volt-lab"))
DEFAULT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "VOLT_IN_LAB": "1",
}


class LabError(StellarError):
    """The lab itself failed (QEMU missing, guest setup failed, timeout)."""


class LabWedged(LabError):
    """The emulated L1 guest stopped making progress (its heartbeat stopped)."""


class LabWedgeWarning(RuntimeWarning):
    """A lab run was started again because L1 wedged in the previous attempt."""


@dataclass(frozen=True)
class LabResult:
    """What a lab command did: exit code, output, and wall time of the whole run."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    console: str
    io_dir: Path | None = None

    def check(self) -> LabResult:
        """Raise :class:`LabError` with the output unless the command exited 0."""
        if self.returncode != 0:
            raise LabError(f"lab command exited {self.returncode}\n--- stdout\n{self.stdout}"
                           f"\n--- stderr\n{self.stderr}")
        return self


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (no QEMU, no kernel, no busybox), or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    try:
        ensure_image()
    except StellarError as exc:
        return f"lab image unavailable: {exc}"
    return None


def qemu_command(image: LabImage, io_dir: Path, *, memory_mib: int, cpus: int,
                 console: Path, writable: Sequence[Path] = ()) -> list[str]:
    """The QEMU command line for one lab run (TCG with emulated SVM + NPT)."""
    shares = [arg for i, p in enumerate(writable) for arg in (
        "-virtfs", f"local,path={_qemu_opt(str(p))},mount_tag=labrw{i},security_model=none")]
    return [
        QEMU, "-M", "pc", "-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm,+npt",
        "-smp", str(cpus), "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={io_dir},mount_tag=labio,security_model=none", *shares,
        # mitigations=off, no_timer_check: each saves boot time under TCG; the lab is a test rig.
        "-append", f"console=ttyS0 quiet panic=-1 mitigations=off no_timer_check "
                   f"volt.io={io_dir}",
    ]


def _qemu_opt(value: str) -> str:
    """Escape a value inside a QEMU -option list (commas are doubled)."""
    return value.replace(",", ",,")


def _script(cmd: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float) -> str:
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 125")
    if timeout > 2 * WATCHDOG_LEAD:
        lines.append(_watchdog(timeout - WATCHDOG_LEAD))
    lines.append(f"exec {shlex.join(cmd)}")
    return "\n".join(lines) + "\n"


def _watchdog(after: float) -> str:
    """A background job that, if the command still runs ``after`` seconds on, writes to
    its stderr where every process is: state and wait channel, each thread's kernel
    stack and syscall, and the Python stacks (py-spy, when installed next to this
    interpreter). A hang that ends in the timeout then says where it hung."""
    spy = Path(sys.executable).with_name("py-spy")
    pyspy = (f'case "$(cat /proc/$p/comm)" in python*|volt*|stellar*) '
             f'{shlex.quote(str(spy))} dump --pid $p;; esac' if spy.exists() else ":")
    return f"""(sleep {after:.0f}
echo "=== volt lab watchdog: still running after {after:.0f}s; where each process is ==="
echo "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
dmesg | grep -iE 'clocksource|tsc' | tail -5
for d in /proc/[0-9]*; do p=${{d#/proc/}}
  c=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null | cut -c1-200)
  [ -n "$c" ] || continue                  # not kernel threads
  echo "--- pid $p ($(cat $d/comm)): $c"
  for t in $d/task/*; do
    echo "  task ${{t##*/}} $(cat $t/comm) wchan=$(cat $t/wchan 2>/dev/null)" \\
         "syscall=$(cut -d' ' -f1 $t/syscall 2>/dev/null)"
    sed 's/^/    /' $t/stack 2>/dev/null
  done
  {pyspy}
done) >&2 </dev/null &"""


def run(cmd: Sequence[str], *, timeout: float = 300.0, cwd: Path | str | None = None,
        env: Mapping[str, str] | None = None, memory_mib: int = 2048, cpus: int = 1,
        writable: Sequence[Path | str] = (), keep: bool = False,
        wedge_after: float = WEDGE_AFTER, wedge_retries: int = 1) -> LabResult:
    """Run ``cmd`` inside the lab guest and return what it did.

    ``cwd`` defaults to the caller's working directory (the host's / is the
    guest's /). ``env`` is added to a small default environment. Each host
    directory in ``writable`` is mounted read-write at its own path in the guest,
    so the command can leave files there for the host. The guest is
    killed after ``timeout`` seconds and :class:`LabError` names the timeout.
    With ``keep`` the per-run directory (console log, outputs) is left in place.

    L1 writes a heartbeat every few seconds. When none arrives for ``wedge_after``
    seconds, the emulated L1 itself has stopped (no command in it can stop its
    kernel's timers), so the run is killed and, up to ``wedge_retries`` times, started
    again with a warning; after that :class:`LabWedged` is raised. The command must
    therefore tolerate being run again from the start.

    One L1 vCPU is the default on purpose: measured here, L2 boots ran twice as
    fast with it, and with two vCPUs the L1 guest occasionally wedged (soft
    lockups on both vCPUs) while an L2 guest ran; none did in 48 one-vCPU boots.
    """
    if not cmd:
        raise UsageError("no command given")
    shares = [Path(p).resolve() for p in writable]
    for p in shares:
        if not p.is_dir() or "\n" in str(p):
            raise UsageError(f"writable share {p} is not a directory")
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    image = ensure_image()
    script = _script(cmd, Path(cwd if cwd is not None else Path.cwd()).resolve(),
                     {**DEFAULT_ENV, **(env or {})}, timeout)
    attempt = 1
    while True:
        try:
            return _run_once(image, script, shares, timeout=timeout, memory_mib=memory_mib,
                             cpus=cpus, keep=keep, wedge_after=wedge_after)
        except LabWedged as exc:
            if attempt > wedge_retries:
                raise
            attempt += 1
            warnings.warn(f"{exc.args[0].splitlines()[0]}; running the command again "
                          f"(attempt {attempt} of {wedge_retries + 1})", LabWedgeWarning,
                          stacklevel=2)


def _run_once(image: LabImage, script: str, shares: list[Path], *, timeout: float,
              memory_mib: int, cpus: int, keep: bool, wedge_after: float) -> LabResult:
    """One boot of L1 running ``script``; see :func:`run`."""
    RUNS_ROOT.mkdir(parents=True, exist_ok=True)
    io_dir = Path(tempfile.mkdtemp(prefix="run-", dir=RUNS_ROOT))
    try:
        (io_dir / "writable").write_text("".join(f"{p}\n" for p in shares))
        (io_dir / "cmd.sh").write_text(script)
        console = io_dir / "console.log"
        argv = qemu_command(image, io_dir, memory_mib=memory_mib, cpus=cpus, console=console,
                            writable=shares)
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            qemu_out = _wait(proc, io_dir / "alive", timeout, wedge_after)
        except LabError as exc:
            raise type(exc)(f"{exc}; console tail:\n{_tail(console)}\n--- stdout tail\n"
                            f"{_tail(io_dir / 'stdout', 40)}\n--- stderr tail\n"
                            f"{_tail(io_dir / 'stderr', 400)}") from None
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - started
        text = console.read_text(errors="replace") if console.exists() else ""
        rc_file = io_dir / "rc"
        if not rc_file.is_file():
            why = next((ln for ln in text.splitlines() if MARK_FAIL in ln), None)
            if why is None and MARK_READY not in text:
                why = "the guest never reached its /init"
            raise LabError(f"lab guest did not report an exit code ({why or 'no reason'}); "
                           f"QEMU exited {proc.returncode}: "
                           f"{qemu_out.decode(errors='replace').strip()[-500:]}\n"
                           f"console tail:\n{_tail(console)}")
        return LabResult(
            returncode=int(rc_file.read_text().strip()),
            stdout=(io_dir / "stdout").read_text(errors="replace"),
            stderr=(io_dir / "stderr").read_text(errors="replace"),
            seconds=seconds, console=text, io_dir=io_dir if keep else None)
    finally:
        if not keep:
            shutil.rmtree(io_dir, ignore_errors=True)


def _wait(proc: subprocess.Popen, alive: Path, timeout: float, wedge_after: float) -> bytes:
    """QEMU's output once it exits; :class:`LabError` after ``timeout`` seconds, and
    :class:`LabWedged` when the heartbeat file ``alive`` has not changed (nor appeared)
    for ``wedge_after`` seconds. The caller kills QEMU."""
    started = changed = time.monotonic()
    beat: bytes | None = None
    while True:
        now = time.monotonic()
        try:
            out, _ = proc.communicate(timeout=max(0.0, min(HEARTBEAT_POLL,
                                                           started + timeout - now)))
            return out
        except subprocess.TimeoutExpired:
            now = time.monotonic()
        if now - started >= timeout:
            raise LabError(f"lab run timed out after {timeout:g}s and was killed")
        try:
            seen: bytes | None = alive.read_bytes()
        except FileNotFoundError:
            seen = None
        if seen != beat:
            beat, changed = seen, now
        elif now - changed >= wedge_after:
            last = f"at L1 uptime {beat.decode(errors='replace').strip()}s" if beat else "ever"
            raise LabWedged(f"lab guest (L1) wedged: no heartbeat for {now - changed:.0f}s "
                            f"(last one {last}) and was killed")


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL if the thread that started us dies (no orphan guests)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no {path.name})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
