"""``volt snapshot create|list|show|rm``: VM snapshots in the store (``volt run --snapshot``).

Parsing only. ``create`` drives a running VM through its API socket, as any
Firecracker client would: pause, ``PUT /snapshot/create``, resume (unless
``--keep-paused``); the other actions read the store (:mod:`volt.snapshot.catalog`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
from typing import TYPE_CHECKING, Any

from stellarium_core.cli.common import JSON, emit, table
from stellarium_core.errors import StellarError

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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=900)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def _call(sock: str, method: str, path: str, body: dict[str, Any]) -> None:
    """One API request; a refusal is a StellarError with the VMM's fault message."""
    conn = _UnixConnection(sock)
    try:
        conn.request(method, path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise StellarError(f"{sock}: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if resp.status >= 300:
        try:
            reason = json.loads(data)["fault_message"]
        except (ValueError, KeyError, TypeError):
            reason = data.decode(errors="replace")[:500]
        raise StellarError(f"{method} {path}: {resp.status}: {reason}")


def _create(args: argparse.Namespace) -> int:
    _call(args.api_sock, "PATCH", "/vm", {"state": "Paused"})
    try:
        _call(args.api_sock, "PUT", "/snapshot/create",
              {"snapshot_path": args.name, "snapshot_type": "Diff" if args.diff else "Full"})
    finally:
        if not args.keep_paused:
            _call(args.api_sock, "PATCH", "/vm", {"state": "Resumed"})
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
