"""Batch.put_files: files prepared by worker processes, queued and committed in order,
exactly as one writer storing them file after file would."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkError, ChunkStore, cosmic
from stellarium_core.nebula import batch as batch_mod
from stellarium_core.nebula.ingest import file_bytes, ingest, load_manifest
from stellarium_core.plugins import Registry

HASHER = Blake3Hasher({})


@pytest.fixture
def tree(tmp_path: Path) -> list[tuple[str, int]]:
    """Files of every kind of size: empty, tiny, below and above FastCDC's minimum,
    repeated ones and repeats inside one, and one over a whole-file read (streamed
    in windows when WHOLE_FILE is lowered)."""
    rnd = random.Random(7)
    root = tmp_path / "tree"
    root.mkdir()
    shared, twice = rnd.randbytes(300_000), rnd.randbytes(300_000)
    blobs = [b"", b"x", rnd.randbytes(5000), rnd.randbytes(20_000), shared,
             shared + rnd.randbytes(70_000), b"text " * 50_000, rnd.randbytes(3_000_000),
             twice * 2]   # chunks repeated within one file
    blobs += [rnd.randbytes(rnd.randrange(100, 200_000)) for _ in range(60)] + [shared]
    files = []
    for i, blob in enumerate(blobs):
        p = root / f"f{i:03d}"
        p.write_bytes(blob)
        files.append((str(p), len(blob)))
    return files


def test_parallel_store_equals_serial(tmp_path: Path, tree, monkeypatch) -> None:
    monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", 0)
    monkeypatch.setattr("stellarium_core.nebula.workers.GROUP_BYTES", 200_000)
    monkeypatch.setattr("stellarium_core.nebula.chunking.WHOLE_FILE", 2_000_000)
    monkeypatch.setattr("stellarium_core.nebula.workers.WHOLE_FILE", 2_000_000)
    chunker = Registry().create("chunker", "fastcdc", {})
    out = {}
    for workers in (0, 1, 3):
        with ChunkStore.open(tmp_path / f"s{workers}", HASHER, create=True) as s:
            with s.batch(limit=1 << 20) as b:   # several commits while workers run ahead
                out[workers] = (list(b.put_files(tree, chunker, workers=workers)) if workers
                                else [b.put_stream(p, chunker) for p, _ in tree])
            out[workers, "items"] = {d: (e.raw, e.refs, e.codec) for d, e in s.items()}
            assert s.fsck().ok
            for (path, _), parts in zip(tree, out[workers], strict=True):
                assert b"".join(s.get(d) for d, _ in parts) == Path(path).read_bytes()
    assert out[0] == out[1] == out[3]
    assert out[0, "items"] == out[1, "items"] == out[3, "items"]


def test_an_unreadable_file_stops_in_its_turn_and_rolls_back(tmp_path: Path, tree,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", 0)
    chunker = Registry().create("chunker", "fastcdc", {})
    bad = tree[:10] + [(str(tmp_path / "gone"), 1000)] + tree[10:]
    with ChunkStore.open(tmp_path / "s", HASHER, create=True) as s:
        got = []
        with pytest.raises(ChunkError, match="cannot read .*gone"):
            with s.batch(limit=1 << 16) as b:
                for parts in b.put_files(bad, chunker, workers=2):
                    got.append(parts)
        assert len(got) == 10                      # every file before it, in order
        assert all(e.refs == 0 for _, e in s.items())   # rolled back


@pytest.mark.parametrize("kind", ["file", "pack"])
def test_a_dedup_hit_dropped_before_the_commit_is_read_again(tmp_path: Path, tree, kind,
                                                            monkeypatch) -> None:
    """A worker saw the chunk indexed, so only its place came back; a gc dropped it
    before the commit: it is read again from its file (or its pack is built again
    from its files), hash-checked, and stored."""
    monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", 0)
    chunker = Registry().create("chunker", "fastcdc", {})
    if kind == "file":
        path, size = next((p, n) for p, n in tree if 1000 < n <= 16384)  # one chunk
        item: tuple = (path, size)
        data = Path(path).read_bytes()
    else:
        item = _packs(tree)[0]
        path, size = item[0][-1]
        data = cosmic.pack_files(item[0], HASHER)
    with ChunkStore.open(tmp_path / "s", HASHER, create=True) as s:
        d = s.put(data)
        for change in (False, True):
            with s.batch() as b:
                files = b.put_files([item, *tree[:2]], chunker, workers=2)
                assert next(files) == [(d, len(data))]
                s.release(d)
                assert s.gc()["chunks_removed"] == 1 and not s.contains(d)
                if change:
                    Path(path).write_bytes(bytes(size))
                    with pytest.raises(ChunkError, match="changed while it was being stored"):
                        list(files)
                        b.commit()
                    b.abandon()
                    continue
                list(files)
            assert s.get(d) == data and s.refs(d) == 1


WORKERS_DIE = r"""
import os, sys
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore, workers
from stellarium_core.plugins import Registry
root, pids, files = sys.argv[1], sys.argv[2], sys.argv[3:]
start = workers._start
def start_and_say(*args):
    start(*args)
    with open(pids, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    import time; time.sleep(0.5)   # slow workers: the parent is killed while they live
workers._start = start_and_say
s = ChunkStore.open(root, Blake3Hasher({}), create=True)
with s.batch() as b:
    for _ in b.put_files([(f, os.path.getsize(f)) for f in files * 50],
                         Registry().create("chunker", "fastcdc", {}), workers=2):
        pass
"""


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_workers_die_with_a_killed_writer(tmp_path: Path, tree) -> None:
    pids = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-c", WORKERS_DIE, str(tmp_path / "s"),
                             str(pids), *[p for p, _ in tree]])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(pids.read_text().split()
                                              if pids.exists() else []) < 2:
        time.sleep(0.02)
    workers = [int(x) for x in pids.read_text().split()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers)


def test_ingest_of_a_tree_in_parallel_reads_back(tmp_path: Path, tree, monkeypatch) -> None:
    monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", 0)
    chunker = Registry().create("chunker", "fastcdc", {})
    with ChunkStore.open(tmp_path / "s", HASHER, create=True) as s:
        res = ingest(s, tmp_path / "tree", chunker)
        doc = load_manifest(s, res.manifest)
        for e in doc["entries"]:
            if e["type"] == "file":
                assert file_bytes(s, e) == (tmp_path / "tree" / e["path"]).read_bytes()
    assert res.files == len(tree) and os.cpu_count()


def _packs(tree: list[tuple[str, int]]) -> list[tuple[tuple[tuple[str, int], ...], int]]:
    """The tree's files under 16 KiB as Cosmic Pack items, four files each."""
    small = [(p, n) for p, n in tree if 0 < n < 16384]
    return [(tuple(small[i:i + 4]), sum(n for _, n in small[i:i + 4]))
            for i in range(0, len(small), 4)]


def test_packs_from_workers_equal_packs_built_here(tmp_path: Path, tree, monkeypatch) -> None:
    items = _packs(tree) * 2 + tree[4:8]   # a repeated pack is one chunk, two references
    assert len(items) > 6
    chunker = Registry().create("chunker", "fastcdc", {})
    out = {}
    for parallel in (0, 1 << 40):
        monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", parallel)
        with ChunkStore.open(tmp_path / f"s{parallel}", HASHER, create=True) as s:
            with s.batch(limit=1 << 16) as b:
                out[parallel] = list(b.put_files(items, chunker, workers=2))
            out[parallel, "items"] = {d: (e.raw, e.refs) for d, e in s.items()}
            for (src, _), parts in zip(items, out[parallel], strict=True):
                if isinstance(src, tuple):
                    ((pack, _),) = parts
                    for slot, (path, _) in enumerate(src):
                        data = cosmic.read_slot(s.get(pack), slot, HASHER)
                        assert data == Path(path).read_bytes()
    assert out[0] == out[1 << 40] and out[0, "items"] == out[1 << 40, "items"]


def test_a_new_chunk_is_stored_as_its_worker_read_it(tmp_path: Path, tree,
                                                    monkeypatch) -> None:
    """Workers compress the chunks they find new and send them: a file (or a small
    file of a pack) rewritten after its worker read it does not change what is
    stored, which matches its digest; a small file that shrank before its pack was
    read is named."""
    monkeypatch.setattr(batch_mod, "PARALLEL_BYTES", 0)
    (files, size), *_ = _packs(tree)
    big = next(p for p, n in tree if n > 100_000)
    before = {p: Path(p).read_bytes() for p in (files[-1][0], big)}
    chunker = Registry().create("chunker", "fastcdc", {})
    cut = batch_mod.cut

    def cut_then_change(*args, **kw):   # after the worker's read, before the commit
        for item, parts in cut(*args, **kw):
            for p, data in before.items():
                Path(p).write_bytes(bytes(len(data)))
            yield item, parts

    monkeypatch.setattr(batch_mod, "cut", cut_then_change)
    with ChunkStore.open(tmp_path / "s", HASHER, create=True) as s:
        with s.batch() as b:
            (pack,), parts = list(b.put_files([(files, size), (big, len(before[big]))],
                                              chunker, workers=1))
        assert s.fsck().ok
        assert cosmic.read_slot(s.get(pack[0]), len(files) - 1, HASHER) == before[files[-1][0]]
        assert b"".join(s.get(d) for d, _ in parts) == before[big]
        Path(files[0][0]).write_bytes(b"now shorter")
        with pytest.raises(ChunkError, match="changed size while being stored"):
            with s.batch() as b:
                b.put_pack(files)


def test_ingest_packs_small_files_and_two_trees_share_their_packs(tmp_path: Path) -> None:
    """Pack cuts follow the paths: one added and one changed file in a second tree
    make only the packs around them new; every file reads back."""
    rnd = random.Random(3)
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        rnd2 = random.Random(5)
        for i in range(400):
            d = root / f"d{i // 50}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:03d}").write_bytes(rnd2.randbytes(rnd2.randrange(1, 12_000)))
    (two / "d3" / "f170b").write_bytes(rnd.randbytes(900))
    (two / "d6" / "f333").write_bytes(rnd.randbytes(700))
    chunker = Registry().create("chunker", "fastcdc", {})
    with ChunkStore.open(tmp_path / "s", HASHER, create=True) as s:
        packs = []
        for root in (one, two):
            doc = load_manifest(s, ingest(s, root, chunker).manifest)
            files = [e for e in doc["entries"] if e["type"] == "file"]
            assert all("packed" in e for e in files)
            for e in files:
                assert file_bytes(s, e) == (root / e["path"]).read_bytes()
            packs.append({e["packed"][0] for e in files})
        assert len(packs[0]) < 400 / 4
        assert 2 <= len(packs[1] - packs[0]) <= 6, (len(packs[0]), len(packs[1] - packs[0]))
        assert s.fsck().ok
