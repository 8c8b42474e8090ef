"""Class 4 of issue #18: a crash leaks nothing that stays, and nothing partial is
ever visible. Real processes, killed with SIGKILL at a point where they have
made references durable, written scratch trees or half an output file."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import new_store, run_cli, tmpfs
from tests.helpers import stellar_json as stellar

#: Bigger than one NEBULA batch (64 MiB), so an operation commits, journals, and is
#: still running when it is killed.
BIG = 3 * (64 << 20)


def wait_for(what: str, pred: Callable[[], bool], proc: subprocess.Popen,
             timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()}"
        assert time.monotonic() < end, f"no {what} after {timeout} s"
        time.sleep(0.005)


def start(cfg: Path, *args: object) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "STELLAR_CONFIG"}
    return subprocess.Popen([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def journaled(store: Path) -> Callable[[], bool]:
    """True once an operation's reference journal holds a durable line."""
    return lambda: any(p.stat().st_size for p in (store / "nebula/pending").glob("*.refs"))


def big_files(d: Path) -> Path:
    d.mkdir()
    for i in range(BIG // (64 << 20)):
        (d / f"f{i}").write_bytes(os.urandom(64 << 20))
    return d


def fsck_clean(cfg: Path) -> None:
    r = run_cli(["--config", cfg, "fsck", "--json"])
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["ok"], rep
    assert [p for p in rep["problems"] if p["severity"] != "note"] == [], rep


def test_killed_ingest_is_reclaimed_by_gc(tmp_path):
    cfg = new_store(tmp_path / "h")
    store = tmp_path / "h" / "store"
    tree = big_files(tmp_path / "tree")
    p = start(cfg, "ingest", tree)
    wait_for("a journaled batch", journaled(store), p)
    kill(p)
    held = stellar(cfg, "stats")["chunks"]
    assert held > 0
    fsck_clean(cfg)                         # the journal accounts for every reference
    out = stellar(cfg, "gc")
    assert out["journals_released"] == 1 and out["chunks_removed"] == held
    assert stellar(cfg, "stats")["chunks"] == 0
    fsck_clean(cfg)


def test_gc_leaves_a_live_ingest_alone(tmp_path):
    cfg = new_store(tmp_path / "h")
    store = tmp_path / "h" / "store"
    tree = big_files(tmp_path / "tree")
    p = start(cfg, "ingest", tree, "--json")
    wait_for("a journaled batch", journaled(store), p)
    lock = os.open(store / "nebula" / "lock", os.O_RDWR)
    try:
        while True:  # stop it outside a commit, or gc would wait for its lock forever
            p.send_signal(signal.SIGSTOP)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                p.send_signal(signal.SIGCONT)
                time.sleep(0.001)
        out = stellar(cfg, "gc")
        assert out["journals_released"] == 0 and out["chunks_removed"] == 0
    finally:
        os.close(lock)
        p.send_signal(signal.SIGCONT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    manifest = json.loads(stdout)["manifest"]
    r = run_cli(["--config", cfg, "cat", manifest], text=False)
    assert r.returncode == 0 and b"nebula-tree" in r.stdout
    assert list((store / "nebula/pending").glob("*.refs")) == []
    fsck_clean(cfg)


def start_import(tmp: Path) -> tuple[Path, Path, subprocess.Popen]:
    """(config, store, process) of `stellar image import` of a big rootfs tar."""
    cfg = new_store(tmp / "h")
    tar = tmp / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(big_files(tmp / "tree"), arcname="data")
    return cfg, tmp / "h" / "store", start(cfg, "image", "import", tar, "img")


def test_killed_image_import_leaves_nothing_after_gc(tmp_path):
    cfg, store, p = start_import(tmp_path)
    wait_for("a journaled batch", journaled(store), p)
    kill(p)
    assert list((store / "images").glob(".import-*"))   # what the kill left
    out = stellar(cfg, "gc")
    assert out["scratch_removed"] == 1 and out["journals_released"] == 1
    assert list((store / "images").glob(".import-*")) == []
    assert stellar(cfg, "stats")["chunks"] == 0 and stellar(cfg, "image", "ls")["images"] == []
    fsck_clean(cfg)


def test_scratch_of_an_import_killed_while_unpacking_is_swept_by_the_next(tmp_path):
    cfg, store, p = start_import(tmp_path)
    wait_for("unpacking", lambda: any(s.stat().st_size for s in
                                      (store / "images").glob(".import-*/data/*")), p)
    kill(p)
    assert list((store / "images").glob(".import-*"))
    small = tmp_path / "small"
    small.mkdir()
    (small / "x").write_text("x")
    stellar(cfg, "image", "import", small, "small")
    assert list((store / "images").glob(".import-*")) == []
    fsck_clean(cfg)


def test_killed_export_never_shows_a_partial_image(tmp_path):
    cfg = new_store(tmp_path / "h")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(BIG))
    stellar(cfg, "vol", "import", "v", raw)
    out = tmp_path / "out" / "disk.raw"
    out.parent.mkdir()
    p = start(cfg, "vol", "export", "v", out)
    wait_for("a partial export", lambda: any(
        f.stat().st_size for f in out.parent.glob(".disk.raw.export-*")), p)
    kill(p)
    assert not out.exists() and list(out.parent.glob(".disk.raw.export-*"))
    stellar(cfg, "vol", "export", "v", out)
    assert out.read_bytes() == raw.read_bytes()
    assert sorted(os.listdir(out.parent)) == ["disk.raw"]


def _manifest_missing_a_chunk(cfg: Path, tmp: Path) -> Path:
    """A captured tree whose one chunk the store lost (released and collected)."""
    src = tmp / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(200_000))
    digest = stellar(cfg, "tree", "capture", src)["digest"]
    m = tmp / "h" / "store" / "volumes" / "trees" / f"{digest}.json"
    doc = json.loads(m.read_bytes())
    lost = [e for e in doc["entries"] if e.get("chunks")][0]["chunks"][-1]
    lost[0] = "ab" * 32
    bad = tmp / "bad.json"
    bad.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))
    return bad


def test_failed_restore_leaves_no_partial_tree(tmp_path):
    cfg = new_store(tmp_path / "h")
    bad = _manifest_missing_a_chunk(cfg, tmp_path)
    target = tmp_path / "out" / "tree"
    r = run_cli(["--config", cfg, "tree", "restore", bad, target])
    assert r.returncode == 1 and "not in the store" in r.stderr
    assert r.stderr.count("\n") == 1
    assert not target.exists() and os.listdir(target.parent) == []


@pytest.fixture
def mountpoint(tmp_path: Path):
    with tmpfs(tmp_path / "mnt", "16m") as mnt:
        yield mnt


def test_restore_into_a_mount_point_is_all_or_nothing(tmp_path, mountpoint):
    """An empty filesystem's root is a fine target (a VM disk being filled)."""
    cfg = new_store(tmp_path / "h")
    bad = _manifest_missing_a_chunk(cfg, tmp_path)
    r = run_cli(["--config", cfg, "tree", "restore", bad, mountpoint])
    assert r.returncode == 1 and os.listdir(mountpoint) == []
    good = tmp_path / "src"
    digest = stellar(cfg, "tree", "capture", good)["digest"]
    stellar(cfg, "tree", "restore", digest, mountpoint)
    assert os.listdir(mountpoint) == ["d"] and os.path.ismount(mountpoint)
    assert (mountpoint / "d" / "big").read_bytes() == (good / "d" / "big").read_bytes()
