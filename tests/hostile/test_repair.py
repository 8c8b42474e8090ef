"""Classes 2 and 3 of issue #18: ``fsck`` sees the whole store, and ``fsck --repair``
loses nothing.

A store is filled with every kind of reference holder (volumes, a clone, a
ShareVol base, a snapshot, an image, a captured tree, an ingest, a plugin
record), its index is then damaged in a generated way, and after ``fsck
--repair`` every holder must read back bit-exact, also after removing some of
them and running ``gc`` (before the recount, repair gave every re-indexed chunk
one reference, and that ``rm`` + ``gc`` freed chunks a clone still used).
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stellarium_core import upkeep
from stellarium_core.distribution import ImageStore, Importer
from stellarium_core.holders import RECORDS, census
from stellarium_core.nebula.ingest import file_bytes, ingest, load_manifest
from stellarium_core.volumes import filetree
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.volume import VolumeStore
from tests.helpers import run_cli
from tests.hostile.common import HOSTILE, new_host, open_host, sandbox, stellar

BLOCK = 1 << 16


def _pool(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(BLOCK) for _ in range(6)]


def fill(cfg: Path, tmp: Path, seed: int) -> dict[str, object]:
    """One of every holder, sharing chunks; what each must read back as."""
    pool = _pool(seed)
    rnd = random.Random(seed)
    want: dict[str, object] = {}
    with open_host(cfg) as host:
        vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        with vols.create("a", 8 * BLOCK) as v:
            for i in range(8):
                v.write(i * BLOCK, rnd.choice(pool))
        vols.clone("a", "b")
        vols.commit("b")                 # b now layers on a ShareVol base
        vols.clone("b", "c")
        with vols.open("c") as v:
            v.write(3 * BLOCK, pool[0])
        vols.snapshot("c", "snap")
        for n in ("a", "b", "c", "snap"):
            with vols.open(n, readonly=True) as v:
                want[f"vol:{n}"] = v.read(0, v.size)
        tree = tmp / "tree"
        (tree / "d").mkdir(parents=True)
        for i, blob in enumerate(pool):
            (tree / "d" / f"f{i}").write_bytes(blob + b"tail")
        (tree / "small").write_bytes(b"a small file, cosmic packed\n")
        images = ImageStore.for_host(host)
        Importer(images, host.chunker, host.hasher).import_path(tree, "img")
        want["image"] = {e.path: e for e in images.flatten("img")}
        # The image's VM form holds references of its own, to the image's chunks.
        disks = ImageDisks.for_host(host)
        digest = images.resolve("img")
        disks.ensure(digest, lambda: images.flatten(digest))
        with disks.open(digest) as disk:
            want["vmdisk"] = (digest, disk.read(0, disk.size))
        with host.store.pending() as journal:
            m = filetree.capture(tree, host.store, host.chunker, host.hasher, journal=journal)
            journal.settle()
            want["tree"] = filetree.save(m, host.store_path / "volumes" / "trees",
                                         host.hasher, host.store, held=True)
        res = ingest(host.store, tree, host.chunker)
        want["ingest"] = res.manifest
        # A plugin record (the contract Volt's kernel registry follows).
        d = host.store.put(pool[1])
        rec = host.store_path / RECORDS / "test"
        rec.mkdir(parents=True)
        (rec / "r.json").write_text(json.dumps({"chunks": {"x": [[d.hex(), BLOCK]]}}))
        want["record"] = (d, pool[1])
        with host.store.lock():
            host.store.compact_index()   # a snapshot, and more log records after it
        with vols.create("late", 2 * BLOCK) as v:
            v.write(0, pool[2])
        want["vol:late"] = pool[2] + bytes(BLOCK)
    return want


def check(cfg: Path, tmp: Path, want: dict[str, object], gone: set[str] = frozenset()) -> None:
    """Everything not in ``gone`` reads back exactly as ``fill`` left it."""
    with open_host(cfg) as host:
        vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        for key, data in want.items():
            if key in gone:
                continue
            if key.startswith("vol:"):
                with vols.open(key[4:], readonly=True) as v:
                    assert v.read(0, v.size) == data, key
        if "image" not in gone:
            out = tmp / f"restored-{uuid.uuid4().hex}"
            images = ImageStore.for_host(host)
            filetree.restore(images.flatten("img"), host.store, out, host.hasher)
            assert filetree.diff_trees(tmp / "tree", out) == []
        if "tree" not in gone:
            m = filetree.load(host.store_path / "volumes" / "trees" /
                              f"{want['tree'].hex()}.json", host.hasher)
            assert all(host.store.get(d) for e in m for d, _ in e.chunks)
        if "ingest" not in gone:
            doc = load_manifest(host.store, want["ingest"])
            assert all(file_bytes(host.store, e) is not None for e in doc["entries"]
                       if e["type"] == "file")
        # The VM disk outlives a removed image until gc prunes it (the CLI does).
        digest, data = want["vmdisk"]
        with ImageDisks.for_host(host).open(digest) as disk:
            assert disk.read(0, disk.size) == data
        if "record" not in gone:
            d, data = want["record"]
            assert host.store.get(d) == data


def remove(cfg: Path, what: str) -> None:
    with open_host(cfg) as host:
        if what.startswith("vol:"):
            VolumeStore(host.store_path / "volumes", host.store, host.hasher).delete(what[4:])
        elif what == "image":
            ImageStore.for_host(host).remove("img")


def fsck(cfg: Path, repair: bool = False):
    with open_host(cfg) as host:
        return upkeep.fsck(host, repair=repair)


def damage_index(nebula: Path, how: str, where: float) -> None:
    snap, log = nebula / "index.snap", nebula / "index.log"
    if how == "flip-snap":
        data = bytearray(snap.read_bytes())
        data[int(where * (len(data) - 1))] ^= 0x5A
        snap.write_bytes(bytes(data))
    elif how == "truncate-snap":
        os.truncate(snap, int(where * snap.stat().st_size))
    elif how == "delete-snap":
        snap.unlink()
    elif how == "truncate-log":
        os.truncate(log, int(where * log.stat().st_size))
    elif how == "flip-log":
        data = bytearray(log.read_bytes())
        data[int(where * (len(data) - 1))] ^= 0x5A
        log.write_bytes(bytes(data))
    elif how == "delete-log":
        log.unlink()


DAMAGE = st.sampled_from(["flip-snap", "truncate-snap", "delete-snap", "truncate-log",
                          "flip-log", "delete-log"])
HOLDERS = ["vol:a", "vol:b", "vol:c", "vol:snap", "vol:late", "image"]


@HOSTILE
@given(how=DAMAGE, where=st.floats(0, 1), seed=st.integers(0, 3),
       drop=st.sets(st.sampled_from(HOLDERS), max_size=4))
def test_repair_after_index_damage_loses_nothing(how, where, seed, drop):
    with sandbox() as tmp:
        cfg = tmp / "host.toml"
        new_host(cfg)
        want = fill(cfg, tmp, seed)
        damage_index(tmp / "store" / "nebula", how, where)
        fsck(cfg)                                   # runs, whatever it finds
        rep = fsck(cfg, repair=True)
        after = fsck(cfg)
        assert after.ok, [str(p) for p in after.errors]
        assert not [p for p in after.problems if p.severity == "warning"], (
            rep.to_dict(), [str(p) for p in after.problems])
        check(cfg, tmp, want)
        for what in sorted(drop):
            remove(cfg, what)
        with open_host(cfg) as host:
            upkeep.gc(host)
        check(cfg, tmp, want, gone=drop)
        assert fsck(cfg).ok


def test_fsck_checks_every_count_and_names_what_is_wrong(tmp_path):
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    fill(cfg, tmp_path, 1)
    assert fsck(cfg).ok
    with open_host(cfg) as host:
        held = census(host.store_path, host.hasher).held
        assert census(host.store_path, host.hasher).complete and len(held) > 10
        vol = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        used = next(iter(vol._read_manifest("c").refs.values())).digest
        host.store.release(used, held[used])          # too few: a later rm would free it
        extra = host.store.put(b"referenced by nothing")  # a leak, an orphan
    rep = fsck(cfg)
    assert not rep.ok
    assert [p.chunk for p in rep.errors] == [used.hex()]
    assert "0 references but manifests account for" in rep.errors[0].what
    leak = [p for p in rep.problems if "no manifest accounts for" in p.what]
    assert leak and "1 named by none" in leak[0].what
    assert fsck(cfg, repair=True).repaired >= 2
    assert fsck(cfg).ok
    with open_host(cfg) as host:
        assert host.store.refs(used) == held[used] and host.store.refs(extra) == 0
        out = upkeep.gc(host)
        assert out["chunks_removed"] == 1 and extra not in host.store


def test_damaged_manifest_is_reported_set_aside_and_never_undercounted(tmp_path):
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    want = fill(cfg, tmp_path, 2)
    vol = tmp_path / "store" / "volumes" / "c.tinyvol"
    with open_host(cfg) as host:
        vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        own = {r.digest for r in vols._read_manifest("c").refs.values()}
    data = bytearray(vol.read_bytes())
    data[70] ^= 1
    vol.write_bytes(bytes(data))
    rep = fsck(cfg)
    assert [p.file for p in rep.errors] == ["volumes/c.tinyvol"]
    assert "checksum" in rep.errors[0].what
    fsck(cfg, repair=True)
    assert (tmp_path / "store/volumes/c.tinyvol.damaged").exists() and not vol.exists()
    rep = fsck(cfg)
    assert rep.ok and any("set aside" in p.what for p in rep.problems)
    remove(cfg, "vol:snap")
    with open_host(cfg) as host:
        upkeep.gc(host)
    check(cfg, tmp_path, want, gone={"vol:c", "vol:snap"})
    # The set-aside volume's chunks kept their references: its data is still there.
    with open_host(cfg) as host:
        assert own and all(host.store.refs(d) > 0 for d in own)


def test_torn_last_record_fails_fsck_and_repair_recovers_it(tmp_path):
    """An acknowledged write whose index record is torn afterwards: exit 1, then 0."""
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    blob = os.urandom(BLOCK)
    with open_host(cfg) as host:
        vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        with vols.create("v", BLOCK) as v:
            v.write(0, blob)                # acknowledged: flushed on close
    log = tmp_path / "store" / "nebula" / "index.log"
    data = bytearray(log.read_bytes())
    data[-30] ^= 0xFF                       # the last record (the volume's PUT) is torn
    log.write_bytes(bytes(data))
    r = run_cli(["--config", cfg, "fsck"])
    assert r.returncode == 1, r.stdout
    assert "named by a manifest but not in the index" in r.stdout and "--repair" in r.stdout
    r = run_cli(["--config", cfg, "fsck", "--repair"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_cli(["--config", cfg, "fsck"]).returncode == 0
    with open_host(cfg) as host:
        vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
        with vols.open("v", readonly=True) as v:
            assert v.read(0, BLOCK) == blob


def test_gc_refuses_a_damaged_index_until_repaired(tmp_path):
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    fill(cfg, tmp_path, 3)
    snap = tmp_path / "store" / "nebula" / "index.snap"
    data = bytearray(snap.read_bytes())
    data[100] ^= 1                                  # inside the first block of records
    snap.write_bytes(bytes(data))
    r = run_cli(["--config", cfg, "gc"])
    assert r.returncode == 1 and "fsck --repair" in r.stderr and r.stderr.count("\n") == 1
    assert run_cli(["--config", cfg, "fsck", "--repair"]).returncode == 0
    assert run_cli(["--config", cfg, "gc"]).returncode == 0


def test_repair_needs_the_store_to_itself(tmp_path):
    cfg = tmp_path / "host.toml"
    new_host(cfg)
    with open_host(cfg) as host:
        host.store.put(b"x")           # this process keeps the store open
        r = run_cli(["--config", cfg, "fsck", "--repair"])
        assert r.returncode == 1 and "to itself" in r.stderr
        r = run_cli(["--config", cfg, "fsck"])
        assert r.returncode == 0 and "not checked" in r.stdout


@pytest.mark.parametrize("name", ["nebula.json", "index.snap"])
@settings(HOSTILE, max_examples=25)  # each example runs seven CLI commands
@given(data=st.binary(max_size=200), keep=st.floats(0, 1))
def test_damaged_metadata_every_command_says_what_is_wrong(tmp_path_factory, name, data,
                                                           keep):
    """Whatever bytes replace nebula.json or index.snap: no traceback, fsck names the file
    and --repair brings the store back."""
    tmp = tmp_path_factory.mktemp("meta")
    cfg = tmp / "host.toml"
    new_host(cfg)
    with open_host(cfg) as host:
        VolumeStore(host.store_path / "volumes", host.store, host.hasher).create(
            "v", BLOCK).close()
        d = host.store.put(b"kept")
        with host.store.lock():
            host.store.compact_index()
    p = tmp / "store" / "nebula" / name
    old = p.read_bytes()
    p.write_bytes(old[:int(keep * len(old))] + data)
    for args in (["stats"], ["vol", "ls"], ["fsck"], ["gc"]):
        code, _, err = stellar("--config", cfg, *args)
        assert code in (0, 1) and err.count("\n") <= 1, (args, err)
    code, out, err = stellar("--config", cfg, "fsck")
    assert code in (0, 1) and (code == 0 or name in out), out
    if name == "nebula.json":
        try:
            meta = json.loads(p.read_bytes())
            broken = not isinstance(meta, dict) or meta.get("hasher") != "blake3"
        except ValueError:
            broken = True
        assert code == (1 if broken else 0), out
    assert stellar("--config", cfg, "fsck", "--repair")[0] == 0
    assert stellar("--config", cfg, "fsck")[0] == 0
    with open_host(cfg) as host:
        assert host.store.get(d) == b"kept"
