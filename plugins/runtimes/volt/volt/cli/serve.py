"""``volt serve SOCKET`` (a pre-imported VMM server) and ``volt spawn SOCKET -- RUN-ARGS``."""

from __future__ import annotations

import argparse

from stellarium_core.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="a pre-started VMM server: each request forks one confined VM",
        description="Import the VMM once and listen on SOCKET (mode 0600); every request "
                    "(volt spawn) forks a child that runs one VM as volt run does, with "
                    "the client's stdin, stdout and stderr, and confines itself.")
    p.add_argument("socket", help="unix socket to listen on")
    p.set_defaults(func=lambda args: _serve(args.socket))
    s = sub.add_parser(
        "spawn", help="run a VM through volt serve: volt spawn SOCKET -- RUN-ARGS",
        description="Ask the volt serve at SOCKET for a VM; everything after -- is given to "
                    "volt run. The console is this terminal; the exit code is the VM's.")
    s.add_argument("socket", help="the volt serve socket")
    s.add_argument("run_args", nargs=argparse.REMAINDER, help="volt run arguments, after --")
    s.set_defaults(func=_spawn)


def _serve(path: str) -> int:
    from volt.serve import serve

    return serve(path)


def _spawn(args: argparse.Namespace) -> int:
    from volt.serve import spawn

    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    if not run_args:
        raise UsageError("volt spawn: give the volt run arguments after --")
    return spawn(args.socket, run_args)
