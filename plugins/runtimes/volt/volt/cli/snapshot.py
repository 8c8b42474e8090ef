"""``volt snapshot create|list|show|rm`` (VM snapshots in the store, ``volt run
--snapshot``) and ``volt migrate`` (a running VM to a ``volt run --incoming`` process).

Parsing only. ``create`` and ``migrate`` drive a running VM through its API socket:
pause, ``PUT /snapshot/create``, resume (unless ``--keep-paused``); ``PUT
/stellar/migrate``. The other actions read the store (:mod:`volt.snapshot.catalog`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from stellarium_core.cli.common import JSON, emit, table
from volt.cli.apicall import call

if TYPE_CHECKING:
    from stellarium_core.host import Host


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="VM snapshots: create, list, show, remove")
    ss = p.add_subparsers(dest="snapshot_command", metavar="ACTION", required=True)
    c = ss.add_parser("create", parents=[JSON], help="snapshot the VM serving --api-sock as "
                      "NAME (then `volt run --snapshot NAME`)")
    c.add_argument("name", metavar="NAME")
    c.add_argument("--api-sock", required=True, metavar="PATH", help="the VM's API socket")
    c.add_argument("--diff", action="store_true",
                   help="a Diff: read only what changed since the VM's last snapshot")
    c.add_argument("--keep-paused", action="store_true", help="leave the VM paused after")
    c.set_defaults(func=_create)
    ls = ss.add_parser("list", parents=[JSON], help="snapshots in the store")
    ls.set_defaults(func=_list)
    s = ss.add_parser("show", parents=[JSON], help="one snapshot")
    s.add_argument("name", metavar="NAME")
    s.set_defaults(func=_show)
    rm = ss.add_parser("rm", parents=[JSON], help="remove a snapshot (releases its chunks and "
                       "deletes its volume snapshots)")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_rm)
    m = sub.add_parser("migrate", parents=[JSON], help="move the VM serving --api-sock to "
                       "the `volt run --incoming HOST:PORT` waiting at --to")
    m.add_argument("--api-sock", required=True, metavar="PATH", help="the VM's API socket")
    m.add_argument("--to", required=True, metavar="HOST:PORT")
    m.add_argument("--timeout", type=int, default=30, metavar="S",
                   help="how long one step may wait for the target (default: 30)")
    m.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    d = call(args.api_sock, "PUT", "/stellar/migrate", {"to": args.to,
                                                        "timeout_s": args.timeout})
    emit(args, d, lambda d: f"migrated to {args.to}: sent {d['sent_bytes'] >> 20} MiB for "
                            f"{d['memory_bytes'] >> 20} MiB of memory ({d['chunks_sent']} of "
                            f"{d['chunks_offered']} chunks offered)")
    return 0


def _create(args: argparse.Namespace) -> int:
    call(args.api_sock, "PATCH", "/vm", {"state": "Paused"})
    try:
        call(args.api_sock, "PUT", "/snapshot/create",
              {"snapshot_path": args.name, "snapshot_type": "Diff" if args.diff else "Full"})
    finally:
        if not args.keep_paused:
            call(args.api_sock, "PATCH", "/vm", {"state": "Resumed"})
    from volt.snapshot import catalog

    d = catalog.load(_host(args), args.name).summary()
    emit(args, d, lambda d: f"snapshot {d['name']} ({d['digest'][:16]}): {d['kind']}, "
                            f"{d['memory_mib']} MiB of memory in {d['chunks']} chunks "
                            f"({d['stored_mib']} MiB not zero)")
    return 0


def _host(args: argparse.Namespace) -> Host:
    from stellarium_core.host import Host

    return Host.from_config(args.config)


def _list(args: argparse.Namespace) -> int:
    from volt.snapshot import catalog

    host = _host(args)
    rows = [catalog.load(host, n).summary() for n in catalog.names(host)]
    emit(args, rows, lambda rs: table(
        [(r["name"], r["digest"][:16], r["kind"], r["memory_mib"], r["vcpus"],
          r["stored_mib"], ",".join(r["devices"]), r["created"]) for r in rs],
        ["NAME", "DIGEST", "KIND", "MIB", "VCPUS", "STORED_MIB", "DEVICES", "CREATED"])
        if rs else "no snapshots")
    return 0


def _show(args: argparse.Namespace) -> int:
    from volt.snapshot import catalog

    d = catalog.load(_host(args), args.name).summary()
    emit(args, d, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def _rm(args: argparse.Namespace) -> int:
    from volt.snapshot import catalog

    catalog.remove(_host(args), args.name)
    emit(args, {"removed": args.name}, f"removed {args.name}")
    return 0
