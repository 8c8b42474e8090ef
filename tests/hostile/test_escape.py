"""Class 1 of issue #18: nothing an image, a tar or a manifest names is written
outside its root, or through a symlink.

Tar layers, tree manifests and docker-save archives are generated with planted
symlinks (absolute, relative, climbing, pointing at a watched "host" tree),
hardlinks through them, duplicate names and set-id modes. Whatever the input,
the watched tree must stay bit-for-bit and metadata-identical, nothing may be
left behind, and the only failure allowed is a clear StellarError. A real pull
from nginx of a crafted layer proves the same for layers that arrive by
``stellar pull`` and are restored with ``stellar tree restore``.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.nginx import Nginx, nginx_binary
from stellarium_core.confined import ConfinedDir, UnsafePathError
from stellarium_core.distribution import ImageError
from stellarium_core.errors import StellarError
from stellarium_core.volumes import filetree
from tests.helpers import new_store, run_cli
from tests.hostile.common import (
    HASHER,
    HOSTILE,
    OUT,
    image_store,
    importer,
    leftovers,
    make_outside,
    sandbox,
    snapshot,
    tar_of,
)

COMPONENT = st.sampled_from(["a", "b", "victim", "dir", "secret"])
NAME = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "./", "/"]),
    st.lists(COMPONENT, min_size=1, max_size=3))
# Link targets aimed at the watched tree from every depth a root may sit at.
OUTSIDE_TARGET = st.sampled_from(
    [OUT, f"{OUT}/victim", f"{OUT}/dir", f"{OUT}/dir/secret"]
    + [("../" * k) + p for k in range(1, 6) for p in ("outside", "outside/victim",
                                                       "outside/dir")])
TARGET = st.one_of(OUTSIDE_TARGET, NAME)
MODE = st.sampled_from([0o644, 0o755, 0o4755, 0o6777, 0o000, 0o1777])
MEMBER = st.one_of(
    st.tuples(NAME, st.just("file"), st.binary(max_size=64), MODE),
    st.tuples(NAME, st.just("dir"), st.none(), MODE),
    st.tuples(NAME, st.sampled_from(["symlink", "hardlink"]), TARGET, st.just(0o777)),
    st.tuples(NAME, st.sampled_from(["fifo", "char"]), st.none(), MODE),
)


@HOSTILE
@given(members=st.lists(MEMBER, min_size=1, max_size=12))
def test_tar_import_and_restore_never_write_outside(members):
    with sandbox() as tmp:
        outside = make_outside(tmp)
        before = snapshot(outside)
        tarball = tmp / "layer.tar"
        tarball.write_bytes(tar_of(members, outside))
        with image_store(tmp / "store") as images:
            try:
                importer(images).import_path(tarball, "x")
            except ImageError:
                assert images.index() == {}
            else:
                try:
                    filetree.restore(images.flatten("x"), images.store, tmp / "target", HASHER)
                except StellarError:
                    pass
            assert snapshot(outside) == before
            assert leftovers(tmp / "store") == []


ENTRY_TYPE = st.sampled_from(["dir", "file", "symlink", "hardlink", "fifo"])


@st.composite
def manifests(draw):
    """A tree manifest document: a root, then entries in any order, links anywhere."""
    entries = [{"path": ".", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0,
                "mtime_ns": 0}]
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(ENTRY_TYPE)
        e = {"path": "/".join(draw(st.lists(COMPONENT, min_size=1, max_size=3))),
             "type": kind, "mode": draw(MODE), "uid": 0, "gid": 0, "mtime_ns": 0}
        if kind == "file":
            e["size"] = 0
        if kind in ("symlink", "hardlink"):
            e["target"] = draw(TARGET).lstrip("./") if kind == "hardlink" and draw(
                st.booleans()) else draw(TARGET)
        entries.append(e)
    return entries


@HOSTILE
@given(entries=manifests())
def test_restore_of_any_manifest_stays_inside_its_target(entries):
    with sandbox() as tmp:
        outside = make_outside(tmp)
        before = snapshot(outside)
        for e in entries:
            if "target" in e:
                e["target"] = e["target"].replace(OUT, str(outside))
        data = filetree.canonical_json({"format": filetree.FORMAT, "version": 1,
                                        "hasher": "blake3", "entries": entries})
        with image_store(tmp / "store") as images:
            try:
                m = filetree.Manifest.decode(data)
                filetree.restore(m, images.store, tmp / "target", HASHER)
            except StellarError:
                pass
            else:  # restored: every entry is where the manifest says, inside the target
                for e in m.entries:
                    assert os.path.lexists(tmp / "target" / e.path)
        assert snapshot(outside) == before


def test_the_classic_escapes_are_each_refused(tmp_path):
    """The issue's own examples, one by one, with their messages."""
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    cases = {
        "symlink then file of the same name overwrites the host file": [
            ("etc", "dir", None, 0o755),
            ("etc/passwd", "symlink", f"{OUT}/victim", 0o777),
            ("etc/passwd", "file", b"root::0:0::/:/bin/sh\n", 0o644)],
        "symlink then directory member chmods the host dir": [
            ("d", "symlink", f"{OUT}/dir", 0o777), ("d", "dir", None, 0o777)],
        "file written through a planted directory symlink": [
            ("d", "symlink", f"{OUT}/dir", 0o777), ("d/su", "file", b"\x7fELF", 0o4755)],
        "hardlink through a symlink links a host file into the image": [
            ("d", "symlink", f"{OUT}/dir", 0o777), ("stolen", "hardlink", "d/secret", 0o644)],
        "hardlink climbing out": [("stolen", "hardlink", "../../../outside/victim", 0o644)],
    }
    for i, (what, members) in enumerate(cases.items()):
        t = tmp_path / f"case{i}.tar"
        t.write_bytes(tar_of(members, outside))
        with image_store(tmp_path / f"store{i}") as images:
            try:
                importer(images).import_path(t, "x")
            except ImageError as exc:
                assert "symlink" in str(exc) or "escapes" in str(exc) or "not in" in str(exc)
            else:  # a later member replaced the link: the image holds the file itself
                p = {e.path: e for e in images.flatten("x")}
                assert "stolen" not in p, what
                assert all(e.type != "symlink" for k, e in p.items() if k in ("etc/passwd", "d"))
        assert snapshot(outside) == before, what


def docker_save(root: Path, files: dict[str, bytes], links: dict[str, str],
                manifest: object) -> Path:
    """A docker-save tarball: manifest.json, config and layer files, planted symlinks."""
    t = root / "image.tar"
    with tarfile.open(t, "w") as tar:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **files}.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, __import__("io").BytesIO(data))
        for name, target in links.items():
            ti = tarfile.TarInfo(name)
            ti.type, ti.linkname = tarfile.SYMTYPE, target
            tar.addfile(ti)
    return t


PATH_FIELD = st.sampled_from([
    "cfg.json", "l1/layer.tar", "l2/layer.tar", "../outside/config.json",
    "../../outside/config.json", "/outside/config.json", "in/config.json", "out/config.json",
    "up/config.json", "abs/config.json", "out/layer.tar", "loop/x", "l2", "."])


@HOSTILE
@given(config=PATH_FIELD, layers=st.lists(PATH_FIELD, min_size=1, max_size=3))
def test_docker_save_path_fields_resolve_inside_the_archive(config, layers):
    with sandbox() as tmp:
        outside = make_outside(tmp)
        (outside / "config.json").write_text(json.dumps({"config": {"Env": ["SECRET=host"]}}))
        (outside / "layer.tar").write_bytes(tar_of([("stolen", "file", b"x", 0o644)], outside))
        before = snapshot(outside)
        layer = tar_of([("etc", "dir", None, 0o755), ("etc/ok", "file", b"ok", 0o644)], outside)
        t = docker_save(tmp, {"cfg.json": b'{"config": {"Env": ["A=1"]}}',
                              "l1/layer.tar": layer},
                        {"l2": "l1", "in": ".", "out": str(outside),
                         "up": "../../../../outside", "abs": str(outside.parent),
                         "loop": "loop"},
                        [{"Config": config, "Layers": layers}])
        with image_store(tmp / "store") as images:
            try:
                importer(images).import_path(t, "x")
            except ImageError:
                assert images.index() == {}
            else:
                image = images.image("x")
                assert "SECRET=host" not in json.dumps(image.config)
                assert all(e.path != "stolen" for e in images.flatten("x"))
            assert leftovers(tmp / "store") == []
        assert snapshot(outside) == before


def test_docker_save_repeated_layer_linked_inside_the_archive_imports(tmp_path):
    """Old docker-save archives link a repeated layer.tar to its first copy."""
    outside = make_outside(tmp_path)
    layer = tar_of([("etc", "dir", None, 0o755), ("etc/ok", "file", b"ok", 0o644)], outside)
    t = docker_save(tmp_path, {"cfg.json": b'{"config": {"Cmd": ["/bin/sh"]}}',
                               "l1/layer.tar": layer},
                    {"l2/layer.tar": "../l1/layer.tar"},
                    [{"Config": "cfg.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}])
    with image_store(tmp_path / "store") as images:
        importer(images).import_path(t, "x")
        assert images.image("x").config == {"Cmd": ["/bin/sh"]}
        assert {e.path for e in images.flatten("x")} == {".", "etc", "etc/ok"}


def test_oci_layout_whose_blobs_dir_is_a_symlink_out_is_refused(tmp_path):
    outside = make_outside(tmp_path)
    layout = tmp_path / "oci"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps(
        {"manifests": [{"digest": "sha256:" + "a" * 64}]}))
    os.symlink(outside, layout / "blobs")
    before = snapshot(outside)
    with image_store(tmp_path / "store") as images:
        with pytest.raises(ImageError, match="symlink"):
            importer(images).import_path(layout, "x")
    assert snapshot(outside) == before


@pytest.mark.parametrize("rel", ["a/../b", "../x", "/abs", "a//b", "", "a/./b", "nul\0"])
def test_unsafe_relative_paths_are_refused(tmp_path, rel):
    with ConfinedDir(tmp_path) as root, pytest.raises(UnsafePathError):
        root.create(rel)


def _crafted_layer(images, outside: Path) -> bytes:
    """A layer manifest, valid JSON and correctly hashed, whose file sits under a
    symlink to the host: what a hostile CDN can serve."""
    payload = b"#!/bin/sh\necho owned\n"
    digest = images.store.put(payload)
    entries = [
        {"path": ".", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime_ns": 0},
        {"path": "a", "type": "symlink", "target": str(outside), "mode": 0o777,
         "uid": 0, "gid": 0, "mtime_ns": 0},
        {"path": "a/evil", "type": "file", "mode": 0o4755, "uid": 0, "gid": 0,
         "mtime_ns": 0, "size": len(payload), "chunks": [[digest.hex(), len(payload)]]},
    ]
    data = filetree.canonical_json({"format": filetree.FORMAT, "version": 1,
                                    "hasher": "blake3", "entries": entries})
    layer = HASHER.digest(data)
    images.path(layer).write_bytes(data)
    return layer


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (make.py installs it)")
def test_pulled_crafted_layer_cannot_plant_a_setuid_file_outside(tmp_path):
    from stellarium_core.distribution import ImageManifest, publish

    outside = make_outside(tmp_path)
    before = snapshot(outside)
    with image_store(tmp_path / "src") as src:
        layer = _crafted_layer(src, outside)
        with src.locked():
            src.bind("evil", ImageManifest([layer], "blake3", {}))
        publish(src, "evil", tmp_path / "cdn")
    cfg = new_store(tmp_path / "dst")
    with Nginx(tmp_path / "cdn", tmp_path / "nginx") as web:
        r = run_cli(["--config", cfg, "pull", web.url + "tags/evil", "evil"])
    assert r.returncode == 0, r.stderr
    manifest = tmp_path / "dst" / "store" / "images" / "manifests" / f"{layer.hex()}.json"
    r = run_cli(["--config", cfg, "tree", "restore", manifest, tmp_path / "target"])
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "a/evil" in r.stderr and "not under a directory" in r.stderr
    assert snapshot(outside) == before and not (outside / "evil").exists()
