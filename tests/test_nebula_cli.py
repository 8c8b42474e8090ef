"""``stellar ingest|cat|stats|gc|fsck`` driven as a user would, in subprocesses."""

from __future__ import annotations

import fcntl
import json
import os
import random
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from tests.helpers import new_store, run_cli


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return new_store(tmp_path)


def _tree(root: Path) -> None:
    rnd = random.Random(7)
    (root / "sub" / "deeper").mkdir(parents=True)
    big = rnd.randbytes(700_000)
    (root / "a.bin").write_bytes(big)
    (root / "sub" / "copy.bin").write_bytes(big)          # dedups whole
    (root / "sub" / "deeper" / "small.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    os.symlink("sub/deeper/small.txt", root / "link")


def test_ingest_cat_stats_gc_fsck(cfg: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    _tree(tree)
    r = run_cli(["--config", cfg, "ingest", tree])
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                     # no progress bar when stderr is not a terminal
    manifest = r.stdout.strip()
    assert len(manifest) == 64
    r = run_cli(["--config", cfg, "cat", manifest])
    doc = json.loads(r.stdout)
    by_path = {e["path"]: e for e in doc["entries"]}
    assert by_path["link"] == {**by_path["link"], "type": "symlink",
                               "target": "sub/deeper/small.txt"}
    assert by_path["empty"]["chunks"] == [] and by_path["sub"]["type"] == "dir"
    a = by_path["a.bin"]
    assert a["chunks"] == by_path["sub/copy.bin"]["chunks"]
    data = b"".join(run_cli(["--config", cfg, "cat", h], text=False).stdout
                    for h, _ in a["chunks"])
    assert data == (tree / "a.bin").read_bytes()
    st = json.loads(run_cli(["--config", cfg, "stats", "--json"]).stdout)
    assert st["dedup_ratio"] > 1.9 and st["logical_bytes"] >= 1_400_000
    assert st["chunks"] == len(a["chunks"]) + 2   # + small.txt + the manifest
    r = run_cli(["--config", cfg, "fsck"])
    assert r.returncode == 0 and "0 errors" in r.stdout
    r = run_cli(["--config", cfg, "gc", "--json"])
    assert r.returncode == 0 and json.loads(r.stdout)["chunks_removed"] == 0


def test_fsck_exit_status_names_damage(cfg: Path, tmp_path: Path) -> None:
    f = tmp_path / "one.bin"
    f.write_bytes(random.Random(1).randbytes(9000))
    manifest = run_cli(["--config", cfg, "ingest", f]).stdout.strip()
    doc = json.loads(run_cli(["--config", cfg, "cat", manifest]).stdout)
    chunk = doc["entries"][0]["packed"][0]   # a small file: its Cosmic Pack is the chunk
    pack = tmp_path / "store" / "nebula" / "packs" / "pack-000001.dat"
    with open(pack, "r+b") as fh:
        fh.seek(10)
        fh.write(b"XXXX")
    r = run_cli(["--config", cfg, "fsck"])
    assert r.returncode == 1
    assert f"chunk {chunk}" in r.stdout and "pack-000001.dat" in r.stdout
    r = run_cli(["--config", cfg, "cat", chunk])
    assert r.returncode == 1 and "is corrupt" in r.stderr and "Traceback" not in r.stderr


def test_bad_arguments(cfg: Path, tmp_path: Path) -> None:
    r = run_cli(["--config", cfg, "cat", "nothex"])
    assert r.returncode == 2 and "not a chunk hash" in r.stderr
    r = run_cli(["--config", cfg, "cat", "ab" * 32])
    assert r.returncode == 1 and "not in the store" in r.stderr
    r = run_cli(["--config", cfg, "ingest", tmp_path / "absent"])
    assert r.returncode == 1 and "cannot ingest" in r.stderr and "Traceback" not in r.stderr


def test_progress_bar_on_a_terminal(cfg: Path, tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    f.write_bytes(random.Random(2).randbytes(3_000_000))
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    shown = bytearray()

    def drain() -> None:  # read while the child runs: a closed pty drops unread output
        while True:
            try:
                part = os.read(master, 65536)
            except OSError:
                return
            if not part:
                return
            shown.extend(part)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                               "ingest", str(f)], stdout=subprocess.PIPE, stderr=slave,
                              timeout=120)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert proc.returncode == 0 and len(proc.stdout.strip()) == 64
    assert b"ingest" in shown and b"B/s" in shown
