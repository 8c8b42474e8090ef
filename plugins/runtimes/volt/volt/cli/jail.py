"""``volt jail``: run ``volt run`` inside a jail (chroot, namespaces, cgroups, own uid)."""

from __future__ import annotations

import argparse
from pathlib import Path

from stellarium_core.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "jail", help="start a VMM inside a jail: volt jail --id ID --uid U --gid G -- RUN-ARGS",
        description="Firecracker's jailer steps for Volt: a per-VM root with only what the VMM "
                    "needs, new mount/pid/ipc/uts namespaces, cgroup limits, rlimits and an "
                    "unprivileged uid; the VMM then confines itself (Landlock, seccomp). "
                    "Everything after -- is given to volt run.")
    p.add_argument("--id", required=True, dest="vm_id", help="unique VM id (letters, digits, -)")
    p.add_argument("--uid", required=True, type=int, help="uid the VMM runs as (not 0)")
    p.add_argument("--gid", required=True, type=int, help="gid the VMM runs as (not 0)")
    p.add_argument("--chroot-base-dir", default="/srv/volt-jail", type=Path,
                   help="jails are made in BASE/volt/ID/root (default /srv/volt-jail)")
    p.add_argument("--cgroup", action="append", default=[], metavar="KEY=VALUE",
                   help="cgroup limit, v2 names: memory.max=256M, cpu.max='50000 100000', "
                        "pids.max=64 (repeatable; on a cgroup v1 host the v1 equivalents)")
    p.add_argument("--cgroup-version", choices=("auto", "1", "2"), default="auto",
                   help="auto: v2 where it has the controllers, else v1")
    p.add_argument("--parent-cgroup", default="volt",
                   help="the VM's cgroup is PARENT/ID beneath the jailer's own (default volt)")
    p.add_argument("--netns", metavar="PATH", help="join this network namespace")
    p.add_argument("--resource-limit", action="append", default=[], metavar="RES=N",
                   help="no-file=N (default 2048) or fsize=N (repeatable)")
    p.add_argument("--daemonize", action="store_true",
                   help="detach (setsid, stdio to /dev/null) and return once the VMM started")
    p.add_argument("vmm_args", nargs=argparse.REMAINDER, help="volt run arguments, after --")
    p.set_defaults(func=_jail)


def _jail(args: argparse.Namespace) -> int:
    from volt.jail import jailer

    vmm_args = args.vmm_args[1:] if args.vmm_args[:1] == ["--"] else args.vmm_args
    if not vmm_args:
        raise UsageError("volt jail: give the volt run arguments after --, "
                         "e.g. -- --kernel /path/vmlinux")
    spec = jailer.JailSpec(args.vm_id, args.uid, args.gid, vmm_args, base=args.chroot_base_dir,
                           cgroups=args.cgroup, cgroup_version=args.cgroup_version,
                           parent_cgroup=args.parent_cgroup, netns=args.netns,
                           rlimits=args.resource_limit, daemonize=args.daemonize)
    try:
        return jailer.run(spec)
    except OSError as exc:
        raise jailer.JailError(f"volt jail: {exc.strerror or exc}"
                               + (f": {exc.filename}" if exc.filename else "")) from None
