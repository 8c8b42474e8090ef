"""PHOTON above a real NEBULA store: the packs are the warm level, a directory plays cold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from stellarium_core.holders import census
from stellarium_core.host import Host, init_store
from stellarium_core.nebula import CorruptChunkError, MissingChunkError
from stellarium_core.photon import NebulaTier, from_host
from tests.helpers import run_cli

CONFIG = """
[store]
path = "store"

[tiers.hot]
plugin = "memory"
capacity = "1MiB"
params = { min_available = 0 }

[tiers.cold]
plugin = "nvme"
params = { path = "cold" }
"""


@pytest.fixture
def host(tmp_path: Path) -> Host:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG)
    h = Host.from_config(cfg)
    init_store(h)
    return h


def test_volume_chunks_in_nebula_reach_cold_by_backfill(host: Host) -> None:
    store = host.store
    written = [os.urandom(20000) for _ in range(4)]
    keys = [store.put(d) for d in written]  # as a volume would: straight into NEBULA
    with from_host(host, base_delay=0.01) as r:  # no [tiers.warm]: NEBULA is warm
        assert isinstance(r.tiers["warm"], NebulaTier)
        assert r.backfill() == 4
        assert r.flush(10)
        assert r.backfill() == 0  # cold has them all now
        assert sorted(r.tiers["cold"].keys()) == sorted(keys)
        assert r.get(keys[0]) == written[0] and r.report()["warm"]["hits"] == 1
        assert r.demote(keys[0]) == []  # a volume's reference keeps it in the packs
        assert store.contains(keys[0]) and store.refs(keys[0]) == 1
    res = run_cli(["--config", host.config.source, "tiers", "--json"])
    assert res.returncode == 0, res.stderr
    levels = {t["level"]: t for t in json.loads(res.stdout)["tiers"]}
    assert levels["warm"]["plugin"] == "nebula" and levels["warm"]["objects"] == 4
    assert levels["warm"]["hits"] == 1 and levels["cold"]["objects"] == 4


def test_router_writes_are_nebula_chunks_with_one_photon_reference(host: Host) -> None:
    with from_host(host, nebula_warm=True, base_delay=0.01) as r:
        data = os.urandom(30000)
        key = r.put(data)
        assert host.store.refs(key) == 1
        assert r.flush(10) and r.tiers["cold"].get(key) == data
        assert r.demote(key) == ["warm"]  # PHOTON's own reference is released ...
        assert host.store.refs(key) == 0
        host.store.gc()  # ... and gc reclaims the local copy
        assert not host.store.contains(key)
        assert r.get(key) == data  # back from cold, into the packs again
        assert host.store.get(key) == data
        # PHOTON's reference is a holder fsck counts, shared by every process
        assert census(host.store_path, host.hasher).held[key] == host.store.refs(key) == 1
        assert NebulaTier(host.store, host.store_path / "records").held(key)
    with from_host(host, nebula_warm=True, base_delay=0.01) as r:  # another router
        assert r.demote(key) == ["warm"] and host.store.refs(key) == 0
        assert census(host.store_path, host.hasher).held[key] == 0


def test_corrupt_pack_bytes_are_served_from_cold(host: Host) -> None:
    data = os.urandom(40000)  # incompressible: stored as is
    key = host.store.put(data)
    with from_host(host, nebula_warm=True, base_delay=0.01) as r:
        r.backfill()
        assert r.flush(10)
        e = host.store.entry(key)
        with open(host.store.pack_path(e.pack), "r+b") as pack:
            pack.seek(e.offset + 100)
            pack.write(bytes([data[100] ^ 0xFF]))
        with pytest.raises(CorruptChunkError):
            host.store.get(key)
        assert r.get(key) == data
        assert r.report()["warm"]["corrupt"] == 1 and r.report()["cold"]["hits"] == 1


def test_missing_everywhere_is_nebulas_missing_chunk_error(host: Host) -> None:
    with from_host(host, nebula_warm=True) as r, pytest.raises(MissingChunkError):
        r.get(b"\x07" * 32)


def test_nebula_warm_and_configured_warm_conflict(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG + '\n[tiers.warm]\nplugin = "nvme"\n')
    h = Host.from_config(cfg)
    init_store(h)
    with pytest.raises(Exception, match="cannot also be the NEBULA store"):
        from_host(h, nebula_warm=True)


def test_a_damaged_photon_record_costs_promotions_not_reads(host: Host) -> None:
    with from_host(host, nebula_warm=True, base_delay=0.01) as r:
        data = os.urandom(30000)
        key = r.put(data)
        assert r.flush(10) and r.demote(key) == ["warm"]
        host.store.gc()
        shard = host.store_path / "records" / "photon" / f"warm-{key[0]:02x}.json"
        shard.write_text('{"chunks": {"warm": [["nothex", ')  # torn
        assert r.get(key) == data  # from cold; the copy could not be recorded, so not kept
        assert r.report()["warm"]["errors"] == 1
    host.store.close()  # a repair needs the store to itself
    res = run_cli(["--config", host.config.source, "fsck", "--repair"])
    assert "records/photon/warm-" in res.stdout, res.stdout  # named, and set aside
    assert not shard.exists() and shard.with_name(shard.name + ".damaged").exists()
