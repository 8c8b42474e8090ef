"""``stellar tiers``: what each PHOTON tier holds and how often reads hit it.

Peer nodes ([cluster] peers) have a row of their own between warm and cold.
Usage comes from the configured backends themselves (the NEBULA store is the
warm level when no ``[tiers.warm]`` is configured, the host-wide ``shm`` tier
the hot level when no ``[tiers.hot]`` is; the ``memory`` tier lives in the
process that uses it, so a fresh CLI process reports it empty); hits and
misses are the running totals routers saved under ``<store>/tiers/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from stellarium_core.cli.common import JSON, emit, table
from stellarium_core.errors import StellarError, UsageError
from stellarium_core.holders import RECORDS
from stellarium_core.host import Host
from stellarium_core.photon import NebulaTier, stats
from stellarium_core.photon.router import JOURNAL_FILE, nebula_is_warm, shm_is_hot
from stellarium_core.photon.writeback import journalled


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiers", parents=[JSON], help="usage and hit rate of each PHOTON tier")
    p.set_defaults(func=_show)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def collect(host: Host) -> dict[str, Any]:
    """Usage and counters of every configured tier, plus write-back state."""
    state = host.store_path / "tiers"
    totals = stats.load(state / stats.STATS_FILE)
    tiers = []
    defaults = {"warm": "nebula"} if nebula_is_warm(host) else {}
    if shm_is_hot(host):
        defaults["hot"] = "shm"
    peers = host.config.cluster["peers"]
    for level in ("hot", "warm", "peers", "cold"):
        choice = host.config.tiers.get(level)
        if level == "peers":
            if peers:  # other nodes: counted here, their usage is theirs
                tiers.append({"level": level, "plugin": "http", "objects": len(peers),
                              "used_bytes": None, "capacity_bytes": None, "error": None,
                              **_counters(totals.get(level, {}))})
            continue
        if choice is None and level not in defaults:
            continue
        row: dict[str, Any] = {"level": level,
                               "plugin": choice.plugin if choice else defaults[level],
                               "objects": None, "used_bytes": None,
                               "capacity_bytes": choice.capacity if choice else None,
                               "error": None}
        try:
            if choice:
                backend = host.tiers[level]
            elif level == "hot":
                backend = host.shm_tier()
            else:
                backend = NebulaTier(host.store, host.store_path / RECORDS)
            usage = backend.usage()
            row.update(objects=usage.objects, used_bytes=usage.used_bytes)
            if row["capacity_bytes"] is None:
                row["capacity_bytes"] = usage.capacity_bytes
        except UsageError:
            raise  # a config problem, not a tier that is down
        except StellarError as exc:
            row["error"] = str(exc)
        row.update(_counters(totals.get(level, {})))
        tiers.append(row)
    wb = totals.get("writeback", {})
    return {"store": str(host.store_path), "tiers": tiers,
            "writeback": {"pending": len(journalled(state / JOURNAL_FILE)),
                          "uploaded": wb.get("uploaded", 0), "retries": wb.get("retries", 0)}}


def _counters(counters: dict[str, int]) -> dict[str, Any]:
    return {"hits": counters.get("hits", 0), "misses": counters.get("misses", 0),
            "corrupt": counters.get("corrupt", 0), "evicted": counters.get("evicted", 0),
            "hit_rate": stats.hit_rate(counters)}


def _human(data: dict[str, Any]) -> str:
    rows = []
    for t in data["tiers"]:
        rate = "-" if t["hit_rate"] is None else f"{100 * t['hit_rate']:.1f}%"
        objects = "unavailable" if t["error"] else t["objects"]
        rows.append((t["level"], t["plugin"], objects, _size(t["used_bytes"]),
                     _size(t["capacity_bytes"]), t["hits"], t["misses"], rate))
    out = table(rows, ("LEVEL", "PLUGIN", "OBJECTS", "USED", "CAPACITY", "HITS", "MISSES",
                       "HIT RATE"))
    errors = [f"{t['level']}: {t['error']}" for t in data["tiers"] if t["error"]]
    wb = data["writeback"]
    out += (f"\nwrite-back: {wb['pending']} pending, {wb['uploaded']} uploaded, "
            f"{wb['retries']} retries")
    return "\n".join([out, *errors])


def _show(args: argparse.Namespace) -> int:
    data = collect(Host.from_config(args.config))
    emit(args, data, _human)
    return 1 if any(t["error"] for t in data["tiers"]) else 0
