"""``stellar node serve``: this host as a node of a cluster (chunks by hash, images)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading

from stellarium_core.distribution import ImageStore
from stellarium_core.distribution.node import serve
from stellarium_core.errors import UsageError
from stellarium_core.host import Host


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="this host as a node of a cluster")
    s = p.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    srv = s.add_parser("serve", help="serve this store's chunks by hash to peer nodes, and "
                                     "its images to `stellar pull`, until stopped")
    srv.add_argument("--listen", metavar="HOST:PORT",
                     help="address to listen on (default: [cluster] listen)")
    srv.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    where = args.listen or host.config.cluster["listen"]
    name, _, port = where.rpartition(":")
    if not name or not port.isdigit():
        raise UsageError(f"--listen {where!r}: expected HOST:PORT")
    try:
        server = serve(host.photon, ImageStore.for_host(host), name, int(port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    node = host.config.cluster["node"] or socket.gethostname()
    print(f"node {node} serving {host.store_path} on {server.url}", flush=True)
    stop.wait()
    server.shutdown()
    host.photon.stats.save()
    print(f"stopped; {server.counters}", file=sys.stderr)
    return 0
