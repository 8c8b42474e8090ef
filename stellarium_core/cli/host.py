"""``stellar host init|show``: set a host up from its config file."""

from __future__ import annotations

import argparse

import tomli_w

from stellarium_core.cli.common import JSON, emit
from stellarium_core.host import Host, init_store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("host", help="host setup from the config file")
    hs = p.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    init = hs.add_parser("init", parents=[JSON], help="validate the config and create the store")
    init.set_defaults(func=_init)
    show = hs.add_parser("show", parents=[JSON], help="print the effective config")
    show.set_defaults(func=_show)


def _init(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    root = init_store(host)
    emit(args, {"store": str(root)}, f"store ready at {root}")
    return 0


def _show(args: argparse.Namespace) -> int:
    data = Host.from_config(args.config).effective()
    emit(args, data, lambda d: tomli_w.dumps(d).rstrip())
    return 0
