"""PHOTON router over the real memory and nvme tier plugins (a second nvme plays cold).

The S3 cold tier against a real SeaweedFS is tested in plugins/tiers/s3/tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import TierContext, TierFull
from stellarium_core.photon import ChunkCorrupt, ChunkNotFound, PhotonRouter, Policy, meminfo
from stellarium_core.plugins import Registry

KIB = 1024


def tier(name: str, store: Path, **params: object):
    return Registry().create("tier", name, dict(params), context=TierContext(store))


def chunks(n: int, size: int = 4 * KIB, seed: int = 0) -> list[bytes]:
    return [os.urandom(size - 8) + (seed * 1000 + i).to_bytes(8, "big") for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def three_tiers(store: Path, *, hot: int = 64 * KIB, warm: int | None = None,
                cold_path: str = "cold", **kw: object) -> PhotonRouter:
    tiers = {"hot": tier("memory", store, capacity=hot), "warm": tier("nvme", store),
             "cold": tier("nvme", store, path=cold_path)}
    kw.setdefault("min_available", 0)
    return PhotonRouter(tiers, Blake3Hasher({}), capacities={"warm": warm},
                        state_dir=store / "tiers", base_delay=0.01, max_delay=0.05, **kw)


def test_write_lands_warm_then_cold_and_reads_promote(store: Path) -> None:
    with three_tiers(store) as r:
        data = chunks(1)[0]
        key = r.put(data)
        assert key == Blake3Hasher({}).digest(data)
        assert r.tiers["warm"].contains(key) and not r.tiers["hot"].contains(key)
        assert r.flush(10)
        assert r.tiers["cold"].get(key) == data
        assert r.demote(key) == ["warm"]
        assert not r.tiers["warm"].contains(key)
        assert r.get(key) == data  # from cold: copied back to warm (score 1)
        assert r.tiers["warm"].contains(key) and not r.tiers["hot"].contains(key)
        assert r.get(key) == data  # score 2: now hot
        assert r.tiers["hot"].contains(key)
        assert r.get(key) == data
        rep = r.report()
        assert rep["cold"]["hits"] == 1 and rep["warm"]["hits"] == 1 and rep["hot"]["hits"] == 1
        assert rep["hot"]["misses"] == 2 and rep["warm"]["misses"] == 1
        assert rep["writeback"]["uploaded"] == 1 and rep["writeback"]["pending"] == 0


def test_missing_chunk_is_a_clear_error(store: Path) -> None:
    with three_tiers(store) as r, pytest.raises(ChunkNotFound, match="no tier holds it"):
        r.get(b"\x01" * 32)


def test_hot_capacity_evicts_coldest_and_keeps_pins(store: Path) -> None:
    with three_tiers(store, hot=16 * KIB, policy=Policy(promote_hot=1)) as r:
        keys = [r.put(c) for c in chunks(8)]
        r.pin(keys[:2])
        for _ in range(3):
            r.get(keys[2])  # keys[2] is the most used unpinned chunk
        for k in keys[3:]:
            r.get(k)
            used = r.tiers["hot"].usage().used_bytes
            assert used <= 16 * KIB
        hot = set(r.tiers["hot"].keys())
        assert set(keys[:2]) <= hot and keys[2] in hot
        assert keys[3] not in hot  # coldest: read once, earliest
        assert all(r.get(k) for k in keys)  # evicted ones still readable from warm
        assert r.report()["hot"]["evicted"] >= 4


def test_pinning_more_than_hot_holds_is_refused(store: Path) -> None:
    with three_tiers(store, hot=8 * KIB) as r:
        keys = [r.put(c) for c in chunks(3)]
        with pytest.raises(TierFull, match="cannot be kept hot"):
            r.pin(keys)
        assert all(r.get(k) for k in keys)


def test_warm_is_trimmed_only_after_cold_has_the_chunks(store: Path) -> None:
    blocker = store / "cold-blocked"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the cold directory's parent should be")
    with three_tiers(store, warm=8 * KIB, cold_path="cold-blocked/chunks") as r:
        data = chunks(6)
        keys = [r.put(c) for c in data]
        assert not r.flush(0.3)  # cold cannot take anything yet
        assert r.writeback.retries > 0 and "NotADirectoryError" in r.writeback.last_error
        assert r.tiers["warm"].usage().objects == 6  # over capacity, but nothing dropped
        assert r.report()["warm"]["over_capacity"] >= 1
        blocker.unlink()  # cold comes back
        assert r.flush(10)
        r.put(chunks(1, seed=9)[0])  # the next write trims warm
        assert r.tiers["warm"].usage().used_bytes <= 8 * KIB
        assert [r.get(k) for k in keys] == data


def test_pending_writeback_survives_a_restart(store: Path) -> None:
    blocker = store / "cold-blocked"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("x")
    r = three_tiers(store, cold_path="cold-blocked/chunks")
    keys = [r.put(c) for c in chunks(5)]
    assert not r.close(timeout=0.2)
    journal = (store / "tiers" / "writeback.journal").read_text()
    assert all(f"+ {k.hex()}" in journal for k in keys)
    blocker.unlink()
    r = three_tiers(store, cold_path="cold-blocked/chunks")
    assert r.flush(10)
    assert sorted(r.tiers["cold"].keys()) == sorted(keys)
    r.close()
    assert (store / "tiers" / "writeback.journal").read_text().count("+") == 5
    r = three_tiers(store, cold_path="cold-blocked/chunks")  # replay compacts to nothing
    assert r.writeback.pending() == 0
    r.close()
    assert (store / "tiers" / "writeback.journal").read_text() == ""


def test_corrupt_warm_copy_is_caught_and_repaired_from_cold(store: Path) -> None:
    with three_tiers(store) as r:
        data = chunks(1)[0]
        key = r.put(data)
        assert r.flush(10)
        path = store / "tiers" / "nvme" / key.hex()[:2] / key.hex()
        path.write_bytes(b"\0" * len(data))
        assert r.get(key) == data
        assert r.report()["warm"]["corrupt"] == 1 and r.report()["cold"]["hits"] == 1
        assert path.read_bytes() == data  # rewritten from the good copy


def test_no_good_copy_anywhere_raises_chunk_corrupt(store: Path) -> None:
    with three_tiers(store) as r:
        data = chunks(1)[0]
        key = r.put(data)
        assert r.flush(10)
        for d in ("tiers/nvme", "cold"):
            (store / d / key.hex()[:2] / key.hex()).write_bytes(data[::-1])
        with pytest.raises(ChunkCorrupt, match="warm fails its blake3 check; the copy in cold"):
            r.get(key)


def test_memory_pressure_evicts_unpinned_hot_chunks(store: Path, tmp_path: Path) -> None:
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       1000000 kB\nMemAvailable:    900000 kB\n")
    with three_tiers(store, min_available=100 * KIB, meminfo_path=fake, pressure_every=1,
                     policy=Policy(promote_hot=1)) as r:
        keys = [r.put(c) for c in chunks(6)]
        r.pin(keys[:1])
        for k in keys:
            r.get(k)
        assert r.tiers["hot"].usage().objects == 6
        assert r.relieve_pressure() == 0  # plenty available
        fake.write_text("MemTotal:       1000000 kB\nMemAvailable:        92 kB\n")
        freed = r.relieve_pressure()
        assert freed >= 8 * KIB  # the deficit, in whole chunks
        hot = set(r.tiers["hot"].keys())
        assert keys[0] in hot and len(hot) == 6 - freed // (4 * KIB)
        assert r.report()["hot"]["pressure"] == 1


def test_meminfo_reads_the_real_proc_file() -> None:
    info = meminfo()
    assert 0 < info["MemAvailable"] <= info["MemTotal"]


def test_policy_prefers_frequent_and_recent() -> None:
    p = Policy(half_life=4)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    for _ in range(5):
        p.touch(a)  # often, but long ago
    for _ in range(20):
        p.touch(c)
    p.touch(b)  # once, just now
    assert p.score(a) < 0.1 < p.score(b)
    assert p.victims([a, b, c]) == [a, b, c]
    p.pin(a)
    assert p.victims([a, b, c]) == [b, c]


def test_router_refuses_unknown_levels(store: Path) -> None:
    with pytest.raises(ValueError, match="subset of"):
        PhotonRouter({"lukewarm": tier("memory", store)}, Blake3Hasher({}))


def test_stats_are_saved_and_summed_across_processes(store: Path) -> None:
    from stellarium_core.photon import stats

    for _ in range(2):
        with three_tiers(store) as r:
            key = r.put(b"stats")
            r.get(key)
    totals = stats.load(store / "tiers" / "stats.json")
    assert totals["warm"]["hits"] == 2 and totals["hot"]["misses"] == 2
    assert stats.hit_rate(totals["hot"]) == 0.0 and stats.hit_rate(totals["warm"]) == 1.0


def test_policy_history_stays_bounded_and_keeps_the_hot_half() -> None:
    p = Policy(max_tracked=8)
    hot = b"h" * 32
    for i in range(40):
        p.touch(hot)
        p.touch(i.to_bytes(32, "big"))
    assert len(p._scores) <= 8
    assert p.score(hot) > 10 and p.score((0).to_bytes(32, "big")) == 0.0
