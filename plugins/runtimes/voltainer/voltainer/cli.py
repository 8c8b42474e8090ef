"""``voltainer run|gc|ps``: containers from Stellarium images under systemd-nspawn."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from stellarium_core.cli.common import JSON, emit, run, table
from stellarium_core.host import Host
from voltainer import mounts
from voltainer.runner import gc, runtime_dir
from voltainer.runner import run as run_container


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a command in a container of IMAGE; exits with its code")
    r.add_argument("--private-network", action="store_true",
                   help="give the container only a loopback interface")
    r.add_argument("image", help="image name (stellar image ls) or manifest digest")
    r.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- CMD [ARGS...] (default: the image's Entrypoint + Cmd)")
    r.set_defaults(func=_run)
    g = sub.add_parser("gc", parents=[JSON], help="unmount and delete what crashed runs left")
    g.set_defaults(func=_gc)
    p = sub.add_parser("ps", parents=[JSON], help="list running containers")
    p.set_defaults(func=_ps)


def _run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    host = Host.from_config(args.config)
    return run_container(host, args.image, command, private_network=args.private_network,
                         config=args.config)


def _gc(args: argparse.Namespace) -> int:
    cleaned = gc(Host.from_config(args.config))
    emit(args, {"cleaned": cleaned}, f"cleaned {len(cleaned)} stale container(s)")
    return 0


def _ps(args: argparse.Namespace) -> int:
    states = mounts.live(runtime_dir(Host.from_config(args.config)))
    rows = [{"id": s.id, "image": s.image, "pid": s.runner.pid} for s in states]
    emit(args, rows, lambda rs: table([(r["id"], r["image"], r["pid"]) for r in rs],
                                      ("ID", "IMAGE", "PID")))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voltainer`` console script."""
    return run("voltainer", "Containers on Stellarium images (systemd-nspawn).",
               ("voltainer.cli",), argv)
