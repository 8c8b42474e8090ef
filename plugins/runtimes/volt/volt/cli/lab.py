"""``volt lab run|prepare``: run a command where /dev/kvm is real (nested KVM lab).

The lab modules are imported by the handlers, not here: every ``volt`` command,
``volt run`` included, builds this parser, and the VMM's footprint is measured.
"""

from __future__ import annotations

import argparse
import sys

from stellarium_core.cli.common import JSON, emit
from stellarium_core.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="the nested KVM lab (QEMU TCG guest with real kvm_amd)")
    ls = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    r = ls.add_parser("run", help="run a command inside the lab: volt lab run -- CMD ARGS...")
    r.add_argument("--timeout", type=float, default=300.0, help="seconds before the guest is "
                   "killed (default 300)")
    r.add_argument("--memory", type=int, default=2048, metavar="MIB", help="guest RAM")
    r.add_argument("--cpus", type=int, default=1,
                   help="L1 guest vCPUs (default 1: faster and steadier under TCG here)")
    r.add_argument("--cwd", help="working directory (default: the current one)")
    r.add_argument("--writable", action="append", default=[], metavar="DIR",
                   help="host directory the guest may write (repeatable); the rest of / is "
                        "read-only with a throwaway overlay")
    r.add_argument("--keep", action="store_true", help="keep the run directory and console log")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    r.set_defaults(func=_run)
    pr = ls.add_parser("prepare", parents=[JSON],
                       help="install/build the lab kernel and initramfs now")
    pr.set_defaults(func=_prepare)


def _run(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise UsageError("volt lab run: give the command after --, e.g. volt lab run -- uname -a")
    from volt import lab

    res = lab.run(cmd, timeout=args.timeout, cwd=args.cwd, memory_mib=args.memory,
                  cpus=args.cpus, writable=args.writable, keep=args.keep)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.stdout.flush()
    print(f"volt lab: exit {res.returncode} in {res.seconds:.1f}s"
          + (f"; run dir {res.io_dir}" if res.io_dir else ""), file=sys.stderr)
    return res.returncode


def _prepare(args: argparse.Namespace) -> int:
    from volt.lab.image import ensure_image

    img = ensure_image()
    data = {"kernel": str(img.kernel), "initramfs": str(img.initramfs), "release": img.release}
    emit(args, data, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0
