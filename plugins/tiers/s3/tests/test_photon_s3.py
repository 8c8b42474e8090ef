"""PHOTON end to end with SeaweedFS as the cold tier: write-back, outages, corruption."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from devtools.net import free_port
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import TierContext
from stellarium_core.photon import ChunkCorrupt, PhotonRouter
from stellarium_core.plugins import Registry

KIB = 1024
HASHER = Blake3Hasher({})


def router(store: Path, s3_params: dict, *, warm: bool = True, **kw: object) -> PhotonRouter:
    reg, ctx = Registry(), TierContext(store)
    tiers = {"hot": reg.create("tier", "memory", {"capacity": "256KiB"}, context=ctx),
             "cold": reg.create("tier", "s3", s3_params, context=ctx)}
    if warm:
        tiers["warm"] = reg.create("tier", "nvme", {}, context=ctx)
    kw.setdefault("base_delay", 0.05)
    kw.setdefault("max_delay", 0.5)
    return PhotonRouter(tiers, HASHER, state_dir=store / "tiers", min_available=0, **kw)


def chunks(n: int, size: int = 64 * KIB) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


def object_key(params: dict, key: bytes) -> str:
    return f"stellarium/chunks/{key.hex()[:2]}/{key.hex()}"


def test_upload_evict_locally_read_back(seaweedfs, tmp_path: Path) -> None:
    params = seaweedfs.tier_params()
    data = chunks(12)
    with router(tmp_path, params) as r:
        keys = [r.put(d) for d in data]
        assert r.flush(60)
        for k in keys:
            assert r.demote(k) == ["warm"]
        assert r.tiers["warm"].usage().objects == 0 and r.tiers["hot"].usage().objects == 0
        assert [r.get(k) for k in keys] == data  # each verified, and copied back to warm
        assert r.report()["cold"]["hits"] == 12 and r.report()["cold"]["corrupt"] == 0
        assert r.tiers["warm"].usage().objects == 12
    s3 = seaweedfs.client()
    body = s3.get_object(Bucket=params["bucket"], Key=object_key(params, keys[0]))["Body"]
    assert body.read() == data[0]


def test_without_warm_writes_reach_s3_before_put_returns(seaweedfs, tmp_path: Path) -> None:
    params = seaweedfs.tier_params()
    with router(tmp_path, params, warm=False) as r:
        assert r.writeback is None
        key = r.put(b"straight to cold")
        s3 = seaweedfs.client()
        assert s3.head_object(Bucket=params["bucket"], Key=object_key(params, key))
        assert r.get(key) == b"straight to cold"


def test_corrupt_object_in_s3_is_caught(seaweedfs, tmp_path: Path) -> None:
    params = seaweedfs.tier_params()
    with router(tmp_path, params) as r:
        good, bad = chunks(2)
        kgood, kbad = r.put(good), r.put(bad)
        assert r.flush(60)
        r.demote(kgood)
        r.demote(kbad)
        flipped = bytearray(bad)
        flipped[1000] ^= 0x01  # one bit
        seaweedfs.client().put_object(Bucket=params["bucket"], Key=object_key(params, kbad),
                                      Body=bytes(flipped))
        with pytest.raises(ChunkCorrupt, match=f"{kbad.hex()}.*cold fails its blake3 check"):
            r.get(kbad)
        assert not r.tiers["warm"].contains(kbad)  # the bad bytes went nowhere
        assert r.get(kgood) == good
        assert r.report()["cold"]["corrupt"] == 1


@pytest.mark.slow
def test_outage_during_writeback_loses_nothing(own_seaweedfs, tmp_path: Path) -> None:
    weed = own_seaweedfs
    params = weed.tier_params(read_timeout=2.0)
    data = chunks(40)
    r = router(tmp_path, params, queue_size=8)  # small queue: writers feel the outage
    keys = [r.put(d) for d in data[:10]]
    assert r.flush(60)
    uploaded_before = r.writeback.uploaded

    weed.stop()
    writer = threading.Thread(target=lambda: keys.extend(r.put(d) for d in data[10:]))
    writer.start()
    writer.join(3)
    assert writer.is_alive()  # blocked on the bounded queue: backpressure, not buffering
    assert not r.flush(1)
    assert r.writeback.retries > 0 and r.writeback.uploaded == uploaded_before
    assert "s3 tier" in r.writeback.last_error  # the cause is kept for `report()`

    weed.start()
    writer.join(120)
    assert not writer.is_alive()
    assert r.flush(120)
    assert r.writeback.pending() == 0
    r.close()

    s3 = weed.client()
    for k, d in zip(keys, data, strict=True):
        got = s3.get_object(Bucket=params["bucket"], Key=object_key(params, k))["Body"].read()
        assert HASHER.digest(got) == k and got == d
    with router(tmp_path, params) as r2:  # and through a fresh router, from S3 only
        for k in keys:
            r2.demote(k)
        assert r2.tiers["warm"].usage().objects == 0
        assert [r2.get(k) for k in keys] == data


def _config(tmp_path: Path, params: dict) -> Path:
    lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {str(v).lower()}"
             for k, v in params.items()]
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n\n[tiers.warm]\nplugin = "nvme"\n\n'
                   '[tiers.cold]\nplugin = "s3"\n\n[tiers.cold.params]\n'
                   + "\n".join(lines).replace("'", '"') + "\n")
    return cfg


def test_stellar_tiers_reports_s3_usage_and_hits(seaweedfs, tmp_path: Path) -> None:
    import json

    from stellarium_core.host import Host
    from stellarium_core.photon import from_host
    from tests.helpers import run_cli

    cfg = _config(tmp_path, seaweedfs.tier_params())
    with from_host(Host.from_config(cfg)) as r:
        keys = [r.put(d) for d in chunks(3, 10000)]
        assert r.flush(60)
        r.demote(keys[0])
        r.get(keys[0])
    res = run_cli(["--config", cfg, "tiers", "--json"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    cold = [t for t in data["tiers"] if t["level"] == "cold"][0]
    assert (cold["plugin"], cold["objects"], cold["used_bytes"]) == ("s3", 3, 30000)
    assert cold["hits"] == 1 and cold["hit_rate"] == 1.0
    assert data["writeback"] == {"pending": 0, "uploaded": 3, "retries": 0}


def test_stellar_tiers_with_s3_down_reports_it(tmp_path: Path) -> None:
    from tests.helpers import run_cli

    cfg = _config(tmp_path, {"bucket": "b", "endpoint_url": f"http://127.0.0.1:{free_port()}",
                             "access_key_id": "a", "secret_access_key": "b",
                             "connect_timeout": 1.0, "max_attempts": 1})
    res = run_cli(["--config", cfg, "tiers"])
    assert res.returncode == 1
    assert "unavailable" in res.stdout and "cold: s3 tier" in res.stdout
    assert "Traceback" not in res.stderr + res.stdout


def test_prefetch_and_pin_a_boot_set_from_s3(seaweedfs, tmp_path: Path) -> None:
    params = seaweedfs.tier_params()
    data = chunks(16, 16 * KIB)
    with router(tmp_path, params) as r:
        keys = [r.put(d) for d in data]
        assert r.flush(60)
        for k in keys:
            r.demote(k)
        assert r.prefetch(keys[:8] + keys[:2]) == 8  # duplicates read once
        assert all(r.tiers["warm"].contains(k) for k in keys[:8])
        assert not r.tiers["warm"].contains(keys[8])
        r.pin(keys[8:])  # fetched from S3, verified, kept hot
        assert all(r.tiers["hot"].contains(k) for k in keys[8:])
        assert r.report()["cold"]["hits"] == 16
        with pytest.raises(ChunkCorrupt):
            seaweedfs.client().put_object(Bucket=params["bucket"],
                                          Key=object_key(params, keys[0]), Body=b"bad")
            r.demote(keys[0])
            r.prefetch(keys[:1])
