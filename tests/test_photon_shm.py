"""The host-wide ``shm`` hot tier: shared by processes, bounded, safe under concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.hookspecs import TierContext, TierFull, TierUnavailable, TierUsage
from stellarium_core.host import Host
from stellarium_core.photon.shm import LEDGER, ShmTier, default_path
from tests.helpers import run_cli

HASHER = Blake3Hasher({})


def tier(store: Path, **params: object) -> ShmTier:
    return ShmTier(dict(params), TierContext(store))


def chunk(i: int, n: int = 20000) -> tuple[bytes, bytes]:
    data = random.Random(i).randbytes(n)
    return HASHER.digest(data), data


def test_put_view_delete_and_the_ledger(tmp_path: Path) -> None:
    t = tier(tmp_path / "store", capacity=100_000)
    assert t.root == default_path(tmp_path / "store") and str(t.root).startswith("/dev/shm/")
    keys = []
    for i in range(3):
        k, data = chunk(i)
        t.put(k, data)
        t.put(k, data)  # again: nothing changes
        keys.append(k)
        assert bytes(t.view(k)) == data and t.get(k) == data
    assert t.usage() == TierUsage(3, 60000, 100_000)
    assert (t.root.stat().st_mode & 0o777) == 0o700
    with pytest.raises(TierFull):
        t.put(*chunk(9, 50000))
    t.delete(keys[1])
    t.delete(keys[1])  # absent: not an error
    assert t.view(keys[1]) is None and not t.contains(keys[1])
    assert t.usage().used_bytes == 40000
    # another opener of the same store sees the same chunks and the same ledger
    other = tier(tmp_path / "store", capacity=100_000)
    assert bytes(other.view(keys[0])) == chunk(0)[1] and other.usage().objects == 2
    t.close()
    other.close()


def test_keys_put_unused_chunks_first_oldest_first_and_heal_the_ledger(tmp_path: Path) -> None:
    t = tier(tmp_path / "store")
    keys = [chunk(i)[0] for i in range(3)]
    for i, k in enumerate(keys):
        t.put(k, chunk(i)[1])
        os.utime(t.root / k.hex(), ns=(10**18 + i, 10**18 + i))
    tier(tmp_path / "store").view(keys[0])  # used, by another opener
    assert list(t.keys()) == [keys[1], keys[2], keys[0]]
    assert list(t.keys()) == keys  # the round cleared the marks: oldest first again
    fd = os.open(t.root / LEDGER, os.O_WRONLY)
    os.pwrite(fd, bytes(16), 0)  # as if a writer was killed between rename and ledger
    os.close(fd)
    assert t.usage().objects == 0
    list(t.keys())
    assert t.usage() == TierUsage(3, 60000, 256 << 20)


def _evict_all(store: str, keys: list[bytes]) -> None:
    t = tier(Path(store))
    for k in keys:
        t.delete(k)
    for i in range(10, 20):
        t.put(*chunk(i))  # pages reused by other chunks


def test_a_view_survives_eviction_by_another_process(tmp_path: Path) -> None:
    t = tier(tmp_path / "store")
    k, data = chunk(1)
    t.put(k, data)
    view = t.view(k)
    p = multiprocessing.get_context("spawn").Process(target=_evict_all,
                                                     args=(str(tmp_path / "store"), [k]))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert not t.contains(k) or t.view(k) is view  # gone for new readers ...
    assert bytes(view) == data  # ... but never changed under this one


def _worker(store: str, seed: int, capacity: int, out: multiprocessing.Queue) -> None:
    t = tier(Path(store), capacity=capacity, map_cache=1 << 16)
    rng = random.Random(seed)
    bad = reads = 0
    for _ in range(300):
        i = rng.randrange(24)
        k, data = chunk(i, 8192)
        op = rng.random()
        try:
            if op < 0.45:
                t.put(k, data)
            elif op < 0.9:
                v = t.view(k)
                if v is not None:
                    reads += 1
                    bad += HASHER.digest(v) != k
            else:
                t.delete(k)
        except TierFull:
            for victim in list(t.keys())[:4]:
                t.delete(victim)
    out.put((reads, bad))


def test_concurrent_writers_readers_and_evictors_in_four_processes(tmp_path: Path) -> None:
    store, capacity = str(tmp_path / "store"), 10 * 8192
    ctx = multiprocessing.get_context("spawn")
    q: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(store, s, capacity, q)) for s in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sum(r[0] for r in results) > 100  # they did share chunks
    assert sum(r[1] for r in results) == 0  # and never saw a wrong byte
    t = tier(Path(store), capacity=capacity)
    before = t.usage()
    keys = list(t.keys())  # recounts from the directory itself
    assert t.usage() == before == TierUsage(len(keys), 8192 * len(keys), capacity)
    assert before.used_bytes <= capacity
    assert not [p for p in t.root.iterdir() if p.name.endswith(".tmp")]


def test_a_directory_others_could_write_is_not_trusted(tmp_path: Path) -> None:
    path = Path("/dev/shm") / f"stellarium-test-{os.getpid()}-open"
    path.mkdir(mode=0o700)
    try:
        os.chmod(path, 0o777)
        t = tier(tmp_path / "store", path=str(path))
        with pytest.raises(TierUnavailable, match="not a directory private to uid"):
            t.view(b"\0" * 32)
        cfg = tmp_path / "host.toml"
        cfg.write_text(f'[store]\npath = "store"\n[tiers.hot]\nplugin = "shm"\n'
                       f'params = {{ path = "{path}" }}\n')
        host = Host.from_config(cfg)
        assert run_cli(["--config", cfg, "host", "init"]).returncode == 0
        k = host.store.put(b"x" * 5000)
        assert host.photon.get(k) == b"x" * 5000  # served from NEBULA all the same
        assert host.photon.report()["hot"]["errors"] >= 1
        assert not any(path.iterdir())
    finally:
        for p in path.iterdir():
            p.unlink()
        path.rmdir()


def test_each_chunk_is_verified_and_decompressed_once_per_host(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    assert run_cli(["--config", cfg, "host", "init"]).returncode == 0
    f = tmp_path / "data"
    f.write_bytes(b"compressible " * 4000)  # one chunk, stored lz4-compressed
    manifest = run_cli(["--config", cfg, "ingest", f]).stdout.strip()
    doc = json.loads(run_cli(["--config", cfg, "cat", manifest]).stdout)
    digest = doc["entries"][0]["chunks"][0][0]
    host = Host.from_config(cfg)
    assert host.store.entry(bytes.fromhex(digest)).compressed
    for _ in range(3):  # three processes
        r = run_cli(["--config", cfg, "cat", digest])
        assert r.returncode == 0 and r.stdout == "compressible " * 4000
    rows = {t["level"]: t for t in json.loads(
        run_cli(["--config", cfg, "tiers", "--json"]).stdout)["tiers"]}
    # the manifest was read once from NEBULA, the chunk once from NEBULA and twice hot
    assert (rows["warm"]["hits"], rows["hot"]["hits"], rows["hot"]["misses"]) == (2, 2, 2)
    assert rows["hot"]["objects"] == 2 and rows["hot"]["used_bytes"] > 4000 * 13
