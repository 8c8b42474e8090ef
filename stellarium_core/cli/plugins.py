"""``stellar plugins``: what is installed, read from package metadata."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from stellarium_core import plugins
from stellarium_core.cli.common import JSON, emit, table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", parents=[JSON], help="list installed plugins")
    p.add_argument("--kind", choices=sorted(plugins.NAMESPACES), help="only this kind")
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    found = [asdict(p) for p in plugins.installed(args.kind)]
    emit(args, found, lambda rows: table(
        [(r["namespace"], r["name"], r["distribution"], r["version"]) for r in rows],
        ("NAMESPACE", "NAME", "DISTRIBUTION", "VERSION")))
    return 0
