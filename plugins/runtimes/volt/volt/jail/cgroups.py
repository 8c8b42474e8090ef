"""cgroup limits for one jailed VM: cgroup v2 where its controllers are there, else v1.

Keys are cgroup v2 file names (``memory.max=256M``, ``cpu.max=50000 100000``,
``pids.max=64``); any other ``controller.file`` is written as given. On a v1 or
hybrid host (controllers bound to v1 hierarchies, as on this project's machines,
whose unified hierarchy offers only ``hugetlb``), the three v2 limits are written
as their v1 equivalents, so the same command line limits the VM on both. The
VM's cgroup is made beneath the jailer's own (``/proc/self/cgroup``), so a jailer
run inside a delegated subtree stays inside it; only the VMM joins it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stellarium_core.config import parse_size
from stellarium_core.errors import UsageError

MOUNTS = "/proc/self/mounts"


class CgroupError(OSError):
    """A cgroup could not be created, limited or joined."""


@dataclass
class Cgroups:
    """The cgroup directories made for one VM."""

    version: int
    dirs: list[Path] = field(default_factory=list)

    def add(self, pid: int) -> None:
        """Move ``pid`` (the VMM, before it execs) into every directory."""
        for d in self.dirs:
            _write(d / "cgroup.procs", str(pid))

    def remove(self) -> None:
        """Delete the directories once the VMM has exited."""
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass                 # still busy or already gone: nothing to lose


def parse(specs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` options to a mapping; keys look like ``controller.file``."""
    out = {}
    for spec in specs:
        key, eq, value = spec.partition("=")
        ctrl, dot, name = key.partition(".")
        if not eq or not dot or not ctrl.isalnum() or not name or "/" in key:
            raise UsageError(f"--cgroup {spec!r}: use CONTROLLER.FILE=VALUE, "
                             "e.g. memory.max=256M")
        out[key] = value.strip()
    return out


def _own(hierarchy: str) -> str:
    """The jailer's cgroup path in a hierarchy ("" for v2, else a controller name)."""
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _id, ctrls, path = line.rstrip("\n").split(":", 2)
            if (hierarchy == "" and ctrls == "") or hierarchy in ctrls.split(","):
                return path.lstrip("/")
    return ""


def _mounts(fstype: str) -> list[tuple[str, set[str]]]:
    with open(MOUNTS) as fh:
        rows = [line.split() for line in fh]
    return [(r[1], set(r[3].split(","))) for r in rows if len(r) > 3 and r[2] == fstype]


def _v2_root(controllers: set[str]) -> Path | None:
    for mnt, _opts in _mounts("cgroup2"):
        have = set(Path(mnt, "cgroup.controllers").read_text().split())
        if controllers <= have:
            return Path(mnt)
    return None


def _bytes(value: str) -> str:
    return value if value == "max" else str(parse_size(value))


def _v1_files(key: str, value: str) -> list[tuple[str, str, str]]:
    """(controller, file, value) in v1 terms for one v2-style key."""
    if key == "memory.max":
        return [("memory", "memory.limit_in_bytes", "-1" if value == "max" else _bytes(value))]
    if key == "cpu.max":
        quota, _, period = value.partition(" ")
        return [("cpu", "cpu.cfs_period_us", period or "100000"),
                ("cpu", "cpu.cfs_quota_us", "-1" if quota == "max" else quota)]
    return [(key.partition(".")[0], key, value)]


def setup(limits: dict[str, str], parent: str, vm_id: str, version: str = "auto") -> Cgroups:
    """Create ``<root>/<parent>/<vm_id>`` and write every limit; the caller joins it."""
    controllers = {k.partition(".")[0] for k in limits}
    v2 = _v2_root(controllers) if version in ("auto", "2") else None
    if version == "2" and v2 is None:
        raise CgroupError(f"--cgroup-version 2: no cgroup2 mount offers "
                          f"{', '.join(sorted(controllers))} here")
    if v2 is not None:
        return _setup_v2(v2, limits, controllers, parent, vm_id)
    return _setup_v1(limits, parent, vm_id)


def _setup_v2(root: Path, limits: dict[str, str], controllers: set[str], parent: str,
              vm_id: str) -> Cgroups:
    cg = Cgroups(2)
    d = root / _own("")
    for part in (*Path(parent).parts, vm_id):
        # A child can use a controller only if every ancestor delegates it.
        _write(d / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(controllers)))
        d = d / part
        d.mkdir(exist_ok=True)
    for key, value in limits.items():
        v = _bytes(value) if key == "memory.max" else value
        _write(d / key, v)
    cg.dirs.append(d)
    return cg


def _setup_v1(limits: dict[str, str], parent: str, vm_id: str) -> Cgroups:
    cg = Cgroups(1)
    mounts = _mounts("cgroup")
    for key, value in limits.items():
        for ctrl, name, v in _v1_files(key, value):
            mnt = next((m for m, opts in mounts if ctrl in opts), None)
            if mnt is None:
                raise CgroupError(f"--cgroup {key}: no cgroup v1 or v2 hierarchy has the "
                                  f"{ctrl} controller here")
            d = Path(mnt, _own(ctrl), parent, vm_id)
            d.mkdir(parents=True, exist_ok=True)
            _write(d / name, v)
            if d not in cg.dirs:
                cg.dirs.append(d)
    return cg


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(exc.errno, f"{path}: {exc.strerror} (writing {value!r})") from None
