"""Container state on disk, and tearing down what a run (or a crashed run) left.

Each container gets ``<store>/runtime/<id>/`` with ``lower/`` (the FUSE view),
``upper/`` and ``work/`` (the overlay's writable layer), ``root/`` (the overlay
nspawn boots from) and ``state.json`` naming the processes involved, each by pid
and kernel start time so a recycled pid is never mistaken for ours. A state dir
whose runner is gone is stale: :func:`gc` stops its processes, unmounts
deepest-first (lazily if busy, which also covers a FUSE server that died and
left "transport endpoint is not connected") and deletes the dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stellarium_core.fsutil import write_atomic

STATE = "state.json"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone
    (or a zombie: it has exited, only its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


@dataclass
class Proc:
    """A process by pid and start time, so a recycled pid never passes for ours."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, start_time(pid) or 0)

    def alive(self) -> bool:
        return self.pid > 0 and start_time(self.pid) == self.start


@dataclass
class State:
    """What :func:`cleanup` needs to find after a crash."""

    id: str
    image: str
    digest: str
    runner: Proc
    fuse: Proc | None = None
    nspawn: Proc | None = None
    cgroup: str | None = None
    created: float = field(default_factory=time.time)

    @classmethod
    def load(cls, d: Path) -> State | None:
        try:
            doc = json.loads((d / STATE).read_text())
            procs = {k: Proc(**doc[k]) if doc.get(k) else None
                     for k in ("runner", "fuse", "nspawn")}
            return cls(doc["id"], doc["image"], doc["digest"], procs["runner"], procs["fuse"],
                       procs["nspawn"], doc.get("cgroup"), doc.get("created", 0.0))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, d: Path) -> None:
        write_atomic(d / STATE, json.dumps(asdict(self)).encode(), durable=False)


#: Where a per-container cgroup can go: the v1 ``pids`` hierarchy, else unified v2.
CGROUP_BASES = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


def make_cgroup(cid: str) -> str | None:
    """A cgroup for the container's processes, so a cleanup can find every one of
    them even after nspawn itself is gone; None where cgroups are not writable."""
    for base in CGROUP_BASES:
        if (base / "cgroup.procs").exists():
            path = base / "voltainer" / cid
            try:
                path.mkdir(parents=True)
            except OSError:
                return None
            return str(path)
    return None


def kill_cgroup(path: str, grace: float = 5.0) -> None:
    """SIGKILL everything in the cgroup until it is empty, then remove it."""
    procs = Path(path) / "cgroup.procs"
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    try:
        os.rmdir(path)
    except OSError:
        pass


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mp = line.split()[4]
            mp = (mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
                  .replace("\\134", "\\"))
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def unmount(mountpoint: str) -> None:
    """Unmount, falling back to a lazy detach when it is busy or its FUSE server is dead."""
    r = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, text=True)


def _exited(proc: Proc, wait: float) -> bool:
    """Whether ``proc`` is gone within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while proc.alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def stop(proc: Proc | None, sig: int = signal.SIGTERM, grace: float = 5.0,
         patience: float = 0.0) -> None:
    """Signal ``proc`` if it is still the process we started; SIGKILL after ``grace``.

    A process that is about to exit by itself gets ``patience`` seconds to do so first.
    """
    if proc is None or _exited(proc, patience):
        return
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        return
    if not _exited(proc, grace):
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cleanup(d: Path, state: State | None) -> None:
    """Stop the container and its FUSE server, unmount everything, delete the dir."""
    if state is not None:
        stop(state.nspawn)
        if state.cgroup:  # what nspawn left behind if it died first
            kill_cgroup(state.cgroup)
    for mp in mounts_under(d):
        unmount(mp)
    if state is not None:  # unmounted, it saves its counters and exits by itself
        stop(state.fuse, patience=5.0)
    for mp in mounts_under(d):  # a FUSE server that was slow to let go
        unmount(mp)
    shutil.rmtree(d, ignore_errors=True)


def gc(runtime: Path) -> list[str]:
    """Clean up every container dir whose runner is gone; returns their ids."""
    if not runtime.is_dir():
        return []
    cleaned = []
    for d in sorted(runtime.iterdir()):
        if not d.is_dir():
            continue
        state = State.load(d)
        if state is not None and state.runner.alive():
            continue
        if state is None and time.time() - d.stat().st_mtime < 30:
            continue  # a run still writing its first state file
        cleanup(d, state)
        cleaned.append(d.name)
    return cleaned


def live(runtime: Path) -> list[State]:
    """Containers whose runner is still alive."""
    if not runtime.is_dir():
        return []
    out = []
    for d in sorted(runtime.iterdir()):
        s = State.load(d) if d.is_dir() else None
        if s is not None and s.runner.alive():
            out.append(s)
    return out
