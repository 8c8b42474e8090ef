"""Image import from tarballs, OCI image layouts and docker-save archives; the CLI."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from stellarium_core.distribution import ImageError, ImageStore, Importer
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
from stellarium_core.plugins import Registry
from stellarium_core.volumes import filetree
from tests.helpers import new_store, run_cli


@pytest.fixture
def images(tmp_path: Path):
    hasher = Blake3Hasher({})
    store = ChunkStore.open(tmp_path / "nebula", hasher, create=True)
    yield ImageStore(tmp_path / "images", store, hasher)
    store.close()


@pytest.fixture
def importer(images: ImageStore) -> Importer:
    return Importer(images, Registry().create("chunker", "fastcdc", {}), images.hasher)


def tar_bytes(members: list[tuple[str, bytes | None, dict]], gz: bool = False) -> bytes:
    """A tar of (name, data or None for a dir, extra TarInfo fields)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, extra in members:
            ti = tarfile.TarInfo(name)
            ti.mtime = 1_700_000_000
            if data is None and "type" not in extra:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.size, ti.mode = len(data or b""), 0o644
            for k, v in extra.items():
                setattr(ti, k, v)
            tar.addfile(ti, io.BytesIO(data or b"") if ti.isreg() else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def paths(images: ImageStore, name: str) -> dict[str, filetree.Entry]:
    return {e.path: e for e in images.flatten(name)}


def read(images: ImageStore, e: filetree.Entry) -> bytes:
    if e.pack is not None:
        from stellarium_core.nebula import cosmic
        return cosmic.read_slot(images.store.get(e.pack), e.slot, images.hasher, expect=e.hash)
    return b"".join(images.store.get(d) for d, _ in e.chunks)


def test_rootfs_tarball_keeps_owners_modes_and_links(images, importer, tmp_path):
    t = tmp_path / "rootfs.tar.gz"
    t.write_bytes(tar_bytes([
        ("./etc", None, {}),
        ("./etc/os-release", b"ID=test\n", {"uid": 0}),
        ("./usr", None, {}),
        ("./usr/bin", None, {}),
        ("./usr/bin/su", b"\x7fELF" + os.urandom(9000), {"mode": 0o4755, "uid": 0}),
        ("./home", None, {"uid": 1000, "gid": 1000, "mode": 0o700}),
        ("./bin", b"", {"type": tarfile.SYMTYPE, "linkname": "usr/bin"}),
        ("./usr/bin/su2", b"", {"type": tarfile.LNKTYPE, "linkname": "./usr/bin/su",
                                "mode": 0o4755}),
    ], gz=True))
    importer.import_path(t, "tarred")
    p = paths(images, "tarred")
    assert read(images, p["etc/os-release"]) == b"ID=test\n"
    assert p["usr/bin/su"].mode == 0o4755 and p["usr/bin/su"].size == 9004
    assert (p["home"].uid, p["home"].gid, p["home"].mode) == (1000, 1000, 0o700)
    assert p["bin"].type == "symlink" and p["bin"].target == "usr/bin"
    assert p["usr/bin/su2"].type == "hardlink" and p["etc"].mtime_ns == 1_700_000_000 * 10**9
    assert list(images.root.glob(".import-*")) == []  # scratch space is gone


@pytest.mark.parametrize("members, message", [
    ([("../evil", b"x", {})], "escapes the image root"),
    ([("etc", b"", {"type": tarfile.SYMTYPE, "linkname": "/tmp"}),
      ("etc/passwd", b"x", {})], "through a symlink"),
])
def test_unsafe_tarballs_are_refused(images, importer, tmp_path, members, message):
    t = tmp_path / "bad.tar"
    t.write_bytes(tar_bytes(members))
    with pytest.raises(ImageError, match=message):
        importer.import_path(t, "bad")
    assert images.index() == {} and not os.path.exists("/tmp/passwd")
    assert images.store.stats()["chunks"] == 0


def oci_layout(root: Path, layers: list[bytes], config: dict) -> Path:
    """Write an OCI image layout (index -> manifest -> config + gzip layers)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> dict:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    cfg = blob(json.dumps({"config": config, "rootfs": {"type": "layers"}}).encode())
    man = {"schemaVersion": 2, "config": {**cfg, "mediaType":
                                          "application/vnd.oci.image.config.v1+json"},
           "layers": [{**blob(gzip.compress(t, mtime=0)),
                       "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
                      for t in layers]}
    m = blob(json.dumps(man).encode())
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [m]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


BASE = [("etc", None, {}), ("etc/a", b"a\n", {}), ("etc/b", b"b\n", {}),
        ("var", None, {}), ("var/cache", None, {}), ("var/cache/x", b"x" * 5000, {})]
TOP = [("etc", None, {}), ("etc/.wh.a", b"", {}), ("etc/c", b"c\n", {}),
       ("var", None, {}), ("var/cache", None, {}), ("var/cache/.wh..wh..opq", b"", {}),
       ("var/cache/y", b"y\n", {})]
CONFIG = {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"], "Labels": {"ignored": "yes"}}


def test_oci_layout_layers_stack_with_whiteouts(images, importer, tmp_path):
    layout = oci_layout(tmp_path / "oci", [tar_bytes(BASE), tar_bytes(TOP)], CONFIG)
    importer.import_path(layout, "oci")
    image = images.image("oci")
    assert len(image.layers) == 2 and image.config == {"Env": ["PATH=/usr/bin"],
                                                       "Cmd": ["/bin/sh"]}
    p = paths(images, "oci")
    assert {"etc/b", "etc/c", "var/cache/y"} <= p.keys()
    assert "etc/a" not in p and "var/cache/x" not in p  # whiteout and opaque dir applied


def test_docker_save_archive(images, importer, tmp_path):
    inner = {"layer1/layer.tar": tar_bytes(BASE), "layer2/layer.tar": tar_bytes(TOP)}
    cfg = json.dumps({"config": CONFIG}).encode()
    manifest = json.dumps([{"Config": "cfg.json", "RepoTags": ["x:1"],
                            "Layers": list(inner)}]).encode()
    members = [("cfg.json", cfg, {}), ("manifest.json", manifest, {}),
               ("layer1", None, {}), ("layer2", None, {})]
    members += [(k, v, {}) for k, v in inner.items()]
    t = tmp_path / "saved.tar"
    t.write_bytes(tar_bytes(members))
    importer.import_path(t, "saved")
    p = paths(images, "saved")
    assert "etc/a" not in p and read(images, p["etc/c"]) == b"c\n"
    assert images.image("saved").config["Cmd"] == ["/bin/sh"]


def test_corrupt_oci_blob_is_refused(images, importer, tmp_path):
    layout = oci_layout(tmp_path / "oci", [tar_bytes(BASE)], CONFIG)
    victim = max((layout / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-5] + b"XXXXX")
    with pytest.raises(ImageError, match="does not match its digest"):
        importer.import_path(layout, "oci")
    assert images.index() == {}


@pytest.mark.parametrize("junk", ["[1]", '{"images": [1]}', '{"images": {"a": 5}}',
                                  '{"images": {"a": "zz"}}', "{"])
def test_damaged_image_index_is_an_image_error(images, importer, tmp_path, junk):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    importer.import_path(tree, "box")
    (images.root / "index.json").write_text(junk)
    with pytest.raises(ImageError, match="index.json is corrupt"):
        images.listing()


def test_cli_import_ls_publish_pull_rm(tmp_path):
    cfg = new_store(tmp_path)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("box\n")
    (tree / "big").write_bytes(os.urandom(300_000))

    def stellar(*args, code=0):
        r = run_cli(["--config", cfg, *args])
        assert r.returncode == code, r.stderr
        assert "Traceback" not in r.stderr
        return r

    digest = json.loads(stellar("image", "import", tree, "box", "--json").stdout)["digest"]
    stellar("image", "import", tree, "box2")
    ls = json.loads(stellar("image", "ls", "--json").stdout)
    assert [r["name"] for r in ls["images"]] == ["box", "box2"]
    assert ls["images"][0]["shared_chunks"] == ls["images"][0]["chunks"] > 0
    assert ls["chunks_shared_between_images"] == ls["images"][0]["chunks"]
    site = tmp_path / "site"
    pub = json.loads(stellar("publish", "box", site, "--json").stdout)
    assert pub["digest"] == digest and (site / pub["manifest"]).exists()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_port}/"
        got = json.loads(stellar("pull", url + pub["tag"], "again", "--json").stdout)
        assert got["digest"] == digest and got["blobs_fetched"] == 0  # all chunks local
        r = stellar("pull", url + "tags/missing", "x", "--attempts", "1", code=1)
        assert "HTTP 404" in r.stderr
        r = stellar("pull", url + "nonsense", "x", code=2)
        assert "expected BASE/manifests" in r.stderr
    finally:
        srv.shutdown()
        srv.server_close()
    stellar("image", "rm", "box")
    stellar("image", "rm", "box", code=1)
    r = stellar("image", "import", tmp_path / "nowhere", "n", code=2)
    assert "no such file" in r.stderr
