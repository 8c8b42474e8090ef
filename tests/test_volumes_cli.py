"""`stellar vol ...` and `stellar tree ...` through the real command line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stellarium_core.volumes.filetree import diff_trees
from tests.helpers import new_store, run_cli
from tests.helpers import stellar_json as stellar


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return new_store(tmp_path)


def test_volume_lifecycle(cfg: Path, tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(200_000)
        fh.write(os.urandom(70_000))
    assert stellar(cfg, "vol", "import", "gold", raw)["entries"] == 2
    base = stellar(cfg, "vol", "commit", "gold")["base"]
    clone = stellar(cfg, "vol", "clone", "gold", "vm1")
    assert clone["base"] == base and clone["manifest_bytes"] == 64
    assert stellar(cfg, "vol", "snapshot", "vm1", "snap")["readonly"] is True
    stellar(cfg, "vol", "create", "blank", "10GiB")
    rows = stellar(cfg, "vol", "ls")
    assert [r["name"] for r in rows] == ["blank", "gold", "snap", "vm1"]
    assert stellar(cfg, "vol", "info", "blank")["manifest_bytes"] == 64
    stellar(cfg, "vol", "export", "snap", tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == raw.read_bytes()
    for n in ("gold", "vm1", "snap", "blank"):
        stellar(cfg, "vol", "rm", n)
    assert stellar(cfg, "vol", "ls") == []
    assert not any((cfg.parent / "store/volumes/bases").iterdir())


def test_a_volume_imported_mappable_can_be_mapped_chunk_by_chunk(cfg: Path,
                                                                  tmp_path: Path) -> None:
    """``--mappable``: a DAX base's chunks are raw and page-aligned from the start, so
    no VM has to make a mappable copy first."""
    from stellarium_core.host import Host
    from stellarium_core.volumes.volume import VolumeStore

    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"compressible " * 20_000)
    stellar(cfg, "vol", "import", "plain", raw)
    stellar(cfg, "vol", "import", "dax", raw, "--mappable")
    host = Host.from_config(cfg)
    with host.store as store:
        vols = VolumeStore.for_host(host)
        with vols.open("dax", readonly=True) as vol:
            slots = vol.chunk_slots()
        assert sorted(slots) == [0, 1, 2, 3]
        data = raw.read_bytes()
        for i, d in slots.items():
            assert store.entry(d).mappable and not store.entry(d).compressed
            with store.mapping(d) as m:
                assert os.pread(m.fd, m.length, m.offset) == data[i << 16:(i + 1) << 16]


def test_bad_input_exits_cleanly(cfg: Path, tmp_path: Path) -> None:
    stellar(cfg, "vol", "create", "v", "1MiB")
    for args, code, msg in (
        (["vol", "info", "nope"], 1, "no volume named 'nope'"),
        (["vol", "create", "x", "lots"], 2, "is not a size"),
        (["vol", "create", "../x", "1MiB"], 2, "bad volume name"),
        (["vol", "import", "x", tmp_path / "missing.raw"], 1, "is not a file"),
        (["tree", "restore", "zz", tmp_path / "d"], 1, "neither a manifest file nor a digest"),
        (["tree", "restore", "ab" * 32, tmp_path / "d"], 1, "no tree manifest"),
        (["vol", "export", "v", tmp_path / "no/dir/v.img"], 1,
         f"{tmp_path / 'no/dir/v.img'}: No such file or directory"),
    ):
        r = run_cli(["--config", cfg, *args])
        assert r.returncode == code, (args, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1, r.stderr  # one line


def test_tree_capture_restore(cfg: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/small").write_text("tiny")
    (src / "big").write_bytes(os.urandom(200_000))
    os.symlink("d/small", src / "link")
    out = stellar(cfg, "tree", "capture", src)
    assert out["entries"] == 5 and out["chunks"] >= 2
    stellar(cfg, "tree", "restore", out["digest"], tmp_path / "dst")
    assert diff_trees(src, tmp_path / "dst") == []
    up = tmp_path / "up"
    up.mkdir()
    (up / ".wh.big").write_text("")
    top = stellar(cfg, "tree", "capture", up)
    merged = stellar(cfg, "tree", "stack", out["digest"], top["digest"])
    assert merged["entries"] == 4
    stellar(cfg, "tree", "restore", merged["digest"], tmp_path / "m")
    assert not (tmp_path / "m/big").exists() and (tmp_path / "m/d/small").read_text() == "tiny"
