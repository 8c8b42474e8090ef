"""``volt jail``: Firecracker's jailer steps, around the Python VMM.

In order: check the id, uid and privileges; close inherited fds and drop the
environment; create ``<base>/volt/<id>/root`` (an existing one is an error) and
link or copy the kernel and initrd into it; set rlimits; create the cgroup and
join it; enter new mount, IPC, UTS and PID namespaces (and the given network
namespace); bind what the VMM reads (and its stores) into the root; mknod
/dev/kvm, /dev/net/tun and /dev/null; fork the VMM as pid 1 of its namespace;
there pivot_root, drop to uid/gid for good, and exec ``python -m volt.vmm``,
which then confines itself (Landlock, seccomp). Unless ``--daemonize``, the
jailer waits, forwards SIGTERM/SIGINT, says why the VMM died when seccomp
killed it, and removes the cgroup.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import resource
import shutil
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from stellarium_core.errors import StellarError, UsageError
from volt.jail import cgroups, chroot, seccomp
from volt.jail.policy import Policy

ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
#: An API socket in the jail's root (the VMM's uid owns that directory, nothing below it).
API_SOCK_RE = re.compile(r"/[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEFAULT_BASE = "/srv/volt-jail"
DEFAULT_NOFILE = 2048
RLIMITS = {"no-file": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE}
#: Capabilities the jailer itself uses (bit: name), checked before anything is created.
NEEDED_CAPS = {6: "CAP_SETGID", 7: "CAP_SETUID", 18: "CAP_SYS_CHROOT", 21: "CAP_SYS_ADMIN",
               27: "CAP_MKNOD", 0: "CAP_CHOWN"}
#: Device nodes made in the jail: path -> (major, minor, mode); owned by the VMM's uid.
NODES = {"dev/kvm": (10, 232, 0o600), "dev/net/tun": (10, 200, 0o600),
         "dev/null": (1, 3, 0o666)}
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x4000000, 0x8000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MAX_ID = 2**32 - 2               # (uid_t)-1 means "unchanged" to setresuid

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(StellarError):
    """The jail could not be built or entered (exit 1)."""


@dataclass
class JailSpec:
    """Everything ``volt jail`` takes."""

    vm_id: str
    uid: int
    gid: int
    vmm_args: list[str]
    base: Path = Path(DEFAULT_BASE)
    cgroups: list[str] = field(default_factory=list)
    cgroup_version: str = "auto"
    parent_cgroup: str = "volt"
    netns: str | None = None
    rlimits: list[str] = field(default_factory=list)
    daemonize: bool = False

    @property
    def jail_dir(self) -> Path:
        return self.base / "volt" / self.vm_id

    @property
    def root(self) -> Path:
        return self.jail_dir / "root"


def _effective_caps() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check(spec: JailSpec) -> tuple[dict[int, int], dict[str, str]]:
    """Every input and privilege error, before anything is created; returns the rlimits
    and the cgroup limits."""
    if not ID_RE.fullmatch(spec.vm_id):
        raise UsageError(f"--id {spec.vm_id!r}: use 1-64 letters, digits and hyphens")
    for name, value in (("uid", spec.uid), ("gid", spec.gid)):
        if value == 0:
            raise UsageError(f"--{name} 0: the VMM would keep root's powers; give an "
                             "unprivileged id")
        if not 0 < value <= MAX_ID:
            raise UsageError(f"--{name} {value}: not a valid {name} (1..{MAX_ID})")
    caps = _effective_caps()
    missing = [n for bit, n in NEEDED_CAPS.items() if not caps >> bit & 1]
    if missing:
        raise JailError(f"cannot drop to uid {spec.uid}/gid {spec.gid} in a jail: this process "
                        f"lacks {', '.join(missing)} (run volt jail as root)")
    limits = {RLIMITS["no-file"]: DEFAULT_NOFILE}
    for spec_ in spec.rlimits:
        key, eq, value = spec_.partition("=")
        if key not in RLIMITS or not eq or not value.isdigit():
            raise UsageError(f"--resource-limit {spec_!r}: use no-file=N or fsize=N")
        limits[RLIMITS[key]] = int(value)
    if spec.netns is not None and not os.path.exists(spec.netns):
        raise UsageError(f"--netns {spec.netns}: no such network namespace file")
    if spec.jail_dir.exists():
        raise JailError(f"jail directory {spec.jail_dir} already exists: another VM with id "
                        f"{spec.vm_id!r} runs, or one left it behind (remove it first)")
    return limits, cgroups.parse(spec.cgroups)


def _link_in(src: str, root: Path, uid: int, gid: int) -> str:
    """Hard-link (or copy) a kernel/initrd into the root; returns its path in the jail."""
    name = Path(src).name
    dst = root / name
    st = os.stat(src)
    try:
        if not st.st_mode & stat.S_IROTH:
            raise PermissionError        # unreadable for the VMM's uid: copy and chown
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chown(dst, uid, gid)
        os.chmod(dst, 0o400)
    return "/" + name


class _RunArgs(argparse.ArgumentParser):
    """The ``volt run`` options after ``--``; mistakes are one-line usage errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"volt jail: the volt run arguments after --: {message}")


@dataclass(frozen=True)
class VmmInputs:
    """What the jailed VMM needs besides Python: its kernel and initrd (a file is linked
    into the root; a registry name is read from the store), its host config and that
    host's store (bound; Landlock narrows it once the devices are built), and its
    environment in the jail."""

    kernel: str
    initrd: str
    memory_mib: int
    policy: Policy
    env: dict[str, str]


def vmm_inputs(spec: JailSpec) -> VmmInputs:
    """Check the ``volt run`` arguments the way ``volt run`` reads them (flags over the
    host config's [vm] table) before anything is made."""
    from stellarium_core import config as config_mod
    from volt import api
    from volt.jail import confine
    from volt.vmm import config as vm_config

    parser = _RunArgs(prog="volt jail --", add_help=False)
    parser.add_argument("--config")
    vm_config.add_arguments(parser)
    api.add_arguments(parser)
    confine.add_arguments(parser)
    args = parser.parse_args(spec.vmm_args)
    if args.config_file:
        raise UsageError("volt jail: --config-file is not supported in a jail yet; give "
                         "flags, or --api-sock and configure the VM through the API")
    if args.api_sock is not None and not API_SOCK_RE.fullmatch(args.api_sock):
        raise UsageError(f"volt jail: --api-sock {args.api_sock!r}: give /NAME, a socket in "
                         f"the jail's root ({spec.root}/NAME on the host); every path an API "
                         "client names is then looked up inside the jail")
    host_config = config_mod.load(args.config)
    vm = vm_config.from_args(args, host_config)
    if not vm.kernel and args.api_sock is None:
        raise UsageError("volt jail: the volt run arguments after --: no kernel (give "
                         "--kernel, or kernel in the host config's [vm] table, or "
                         "--api-sock)")
    for p in (vm.kernel, vm.initrd):
        if p and os.sep in p and not os.path.isfile(p):
            raise UsageError(f"volt jail: {p}: no such file")
    policy, env = Policy(), {"HOME": "/"}      # the jail's root: no default config there
    cfg, _explicit = config_mod.config_path(args.config)
    if cfg.exists():
        policy.read.append(str(cfg.resolve()))
        env[config_mod.ENV_VAR] = str(cfg.resolve())
        if os.path.isdir(host_config.store_path):
            policy.write.append(str(host_config.store_path))
    return VmmInputs(vm.kernel, vm.initrd, vm.memory_mib, policy, env)


def args_with_paths(spec: JailSpec, inputs: VmmInputs) -> list[str]:
    """``vmm_args`` with --kernel/--initrd set to the copies in the jail's root (files) or
    the registry names, wherever they came from (flags or [vm])."""
    out, it = [], iter(spec.vmm_args)
    for tok in it:
        opt, eq, _val = tok.partition("=")
        if opt in ("--kernel", "--initrd"):
            if not eq:
                next(it)
        else:
            out.append(tok)
    for opt, val in (("--kernel", inputs.kernel), ("--initrd", inputs.initrd)):
        if val:
            out += [opt, _link_in(val, spec.root, spec.uid, spec.gid)
                    if os.path.isfile(val) else val]
    return out


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise JailError(f"unshare: {os.strerror(err)}")


def _join_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise JailError(f"--netns {path}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def _make_nodes(root: Path, uid: int, gid: int) -> None:
    for rel, (major, minor, mode) in NODES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(p, mode | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(p, mode)                          # mknod honours the umask
        os.chown(p, uid, gid)


def drop_privileges(uid: int, gid: int) -> None:
    """setgroups/setresgid/setresuid, then prove root cannot be had back."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise JailError(f"uid {uid} could still become root again; refusing to run")


def run(spec: JailSpec) -> int:
    """Build the jail, start the VMM in it; returns its exit code (or 0 when daemonized)."""
    limits, cgroup_limits = check(spec)
    inputs = vmm_inputs(spec)
    fsize = limits.get(resource.RLIMIT_FSIZE)
    if fsize is not None and fsize < inputs.memory_mib << 20:
        raise UsageError(f"--resource-limit fsize={fsize} is smaller than the guest memory "
                         f"({inputs.memory_mib} MiB): guest RAM is a memfd, and the limit "
                         "caps its size too")
    policy, env = inputs.policy, inputs.env
    python = chroot.python_paths()
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    spec.jail_dir.mkdir(parents=True, mode=0o700)
    try:
        spec.root.mkdir(mode=0o755)
        argv = args_with_paths(spec, inputs)
        for res, value in limits.items():
            resource.setrlimit(res, (value, value))
        groups = cgroups.setup(cgroup_limits, spec.parent_cgroup, spec.vm_id,
                               spec.cgroup_version) if cgroup_limits else None
    except BaseException:
        shutil.rmtree(spec.jail_dir)         # nothing is mounted in it yet
        raise
    _unshare(CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID)
    if spec.netns:
        _join_netns(spec.netns)
    socket.sethostname(spec.vm_id)
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        _child(spec, argv, env, python + policy.read, policy.write, go_r)
    os.close(go_r)
    try:
        if groups:
            groups.add(pid)              # the VMM alone: the jailer's own pages don't count
        os.write(go_w, b"1")
    finally:
        os.close(go_w)                   # without the byte the child gives up
    (spec.jail_dir / "volt.pid").write_text(f"{pid}\n")
    if spec.daemonize:
        print(f"volt jail: VMM {spec.vm_id} runs as pid {pid} in {spec.root}")
        return 0
    return _supervise(pid, groups)


def _child(spec: JailSpec, argv: list[str], env: dict[str, str], ro: list[str],
           rw: list[str], go: int) -> None:
    """Pid 1 of the new namespace, once in its cgroups: its own mount namespace with the
    root built and pivoted into, detached, privileges dropped, exec. Never returns."""
    try:
        if os.read(go, 1) != b"1":
            os._exit(1)                  # the jailer failed to place it; it says why
        os.close(go)
        # A mount namespace of its own, so pivot_root leaves the jailer's view alone.
        # From here the root holds bind mounts of host trees (stores among them); in the
        # host's namespace it stays plain directories, safe to remove.
        _unshare(CLONE_NEWNS)
        chroot.make_private()
        chroot.expose(spec.root, ro, rw)
        _make_nodes(spec.root, spec.uid, spec.gid)
        os.chown(spec.root, spec.uid, spec.gid)
        devnull = os.open("/dev/null", os.O_RDWR) if spec.daemonize else -1
        chroot.pivot(spec.root)
        if devnull >= 0:
            os.setsid()
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
        drop_privileges(spec.uid, spec.gid)
        os.execve(sys.executable, [sys.executable, "-m", "volt.vmm", *argv], env)
    except (OSError, StellarError) as exc:
        print(f"volt jail: error: {exc}", file=sys.stderr, flush=True)
    os._exit(1)


def _supervise(pid: int, groups: cgroups.Cgroups | None) -> int:
    """Wait for the VMM, forwarding SIGTERM/SIGINT; report how it ended."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: os.kill(pid, s))
    _, status = os.waitpid(pid, 0)
    if groups:
        groups.remove()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = seccomp.explain_kill(pid) if sig == signal.SIGSYS else None
        print(f"volt jail: VMM killed by {signal.Signals(sig).name}"
              + (f": {why}" if why else ""), file=sys.stderr)
        return 128 + sig
    return os.WEXITSTATUS(status)
