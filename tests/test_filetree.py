"""File-tree manifests: capture/restore round trips, damage, and OCI layer stacking."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from stellarium_core.errors import StellarError
from stellarium_core.volumes import filetree
from stellarium_core.volumes.filetree import Manifest, capture, diff_trees, restore, stack
from stellarium_core.volumes.tinyvol import ManifestError


def make_tree(root: Path) -> Path:
    """Every entry kind capture supports, with owners, modes, xattrs and mtimes set."""
    (root / "etc/sub").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello\n")
    (root / "edge4095").write_bytes(os.urandom(4095))
    (root / "edge4096").write_bytes(os.urandom(4096))
    (root / "big").write_bytes(os.urandom(300_000) * 2)
    (root / "etc/dup").write_bytes(b"hello\n")  # same content as "small": one pack slot
    os.link(root / "big", root / "etc/big-link")
    os.link(root / "small", root / "etc/sub/small-link")
    os.symlink("../big", root / "etc/rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "fifo")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "blk", stat.S_IFBLK | 0o640, os.makedev(7, 0))
    os.chmod(root / "small", 0o4755)
    os.chown(root / "small", 1234, 5678)
    os.chmod(root / "etc/sub", 0o1750)
    os.setxattr(root / "edge4096", "user.note", b"\x00binary\xff")
    os.setxattr(root / "etc", "user.dir", b"d")
    os.lchown(root / "etc/rel-link", 42, 43)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(1_000_000_007 * i, 1_600_000_000_123_456_789 + i), follow_symlinks=False)
    os.utime(root, ns=(1, 1_500_000_000_000_000_001))
    return root


def test_round_trip_is_identical(tmp_path, store, chunker, hasher):
    src = make_tree(tmp_path / "src")
    m = capture(src, store, chunker, hasher)
    kinds = {e.path: e.type for e in m}
    assert kinds["etc/big-link"] == "hardlink" and kinds["null"] == "char"
    assert kinds["sock"] == "socket" and kinds["blk"] == "block" and kinds["fifo"] == "fifo"
    by = m.by_path()
    first = by["etc/sub/small-link"]  # walk order: the inode's first path holds the data
    assert by["small"].type == "hardlink" and by["small"].target == first.path
    assert first.pack is not None and first.pack == by["etc/dup"].pack
    assert first.slot == by["etc/dup"].slot
    assert by["edge4096"].pack is None and by["edge4096"].chunks
    digest = filetree.save(m, tmp_path / "trees", hasher, store, held=True)
    loaded = filetree.load(tmp_path / "trees" / f"{digest.hex()}.json", hasher)
    restore(loaded, store, tmp_path / "dst", hasher)
    assert diff_trees(src, tmp_path / "dst") == []
    # the manifest is canonical: capturing again gives the same digest
    assert capture(src, store, chunker, hasher).digest(hasher) == digest


def test_diff_trees_sees_metadata_and_content(tmp_path):
    a = make_tree(tmp_path / "a")
    b = tmp_path / "b"
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    assert diff_trees(a, b) == []  # cp -a keeps everything we compare
    for change in (lambda: os.setxattr(b / "small", "user.x", b"1"),
                   lambda: (b / "big").write_bytes(b"x"),
                   lambda: os.chmod(b / "fifo", 0o600),
                   lambda: os.utime(b / "etc", ns=(0, 0)),
                   lambda: os.unlink(b / "etc/sub/small-link")):
        change()
        assert diff_trees(a, b)
        subprocess.run(["rm", "-rf", str(b)], check=True)
        subprocess.run(["cp", "-a", str(a), str(b)], check=True)


def test_restore_refuses_non_empty_target(tmp_path, store, chunker, hasher):
    src = make_tree(tmp_path / "src")
    m = capture(src, store, chunker, hasher)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    with pytest.raises(StellarError, match="not an empty directory"):
        restore(m, store, dst, hasher)
    assert os.listdir(dst) == ["keep"]
    m.hasher = "sha256"
    with pytest.raises(ManifestError, match="hasher"):
        restore(m, store, tmp_path / "other", hasher)
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "unsafe-path", "not-json"])
def test_damaged_tree_manifest_is_rejected(tmp_path, store, chunker, hasher, damage):
    src = make_tree(tmp_path / "src")
    digest = filetree.save(capture(src, store, chunker, hasher), tmp_path / "t", hasher, store,
                           held=True)
    p = tmp_path / "t" / f"{digest.hex()}.json"
    data = p.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # still valid JSON, but no longer matches its digest
        data = data.replace(b'"uid":1234', b'"uid":1235')
    elif damage == "unsafe-path":
        data = data.replace(b'"path":"etc/dup"', b'"path":"../../etc/dup"')
    else:
        data = b"\x00\x01garbage"
    p.write_bytes(data)
    with pytest.raises(ManifestError):
        filetree.load(p, hasher)
    if damage != "flip":
        with pytest.raises(ManifestError):
            Manifest.decode(data)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("field, value", [
    ("path", 7), ("type", ["file"]), ("xattrs", "user.x"), ("target", 1), ("slot", "0"),
    ("rdev", [1]),
])
def test_wrongly_typed_entry_fields_are_manifest_errors(field, value):
    """A server may hand out any JSON under a valid digest: no AttributeError/TypeError."""
    entry = {"path": "a", "type": "symlink", "mode": 0o777, "uid": 0, "gid": 0,
             "mtime_ns": 0, "target": "b", field: value}
    doc = {"format": filetree.FORMAT, "version": filetree.VERSION, "hasher": "blake3",
           "entries": [{"path": ".", "type": "dir", "mode": 0o755, "uid": 0, "gid": 0,
                        "mtime_ns": 0}, entry]}
    with pytest.raises(ManifestError):
        Manifest.decode(json.dumps(doc).encode())


def test_stack_applies_whiteouts_and_opaque_dirs(tmp_path, store, chunker, hasher):
    low, up = tmp_path / "low", tmp_path / "up"
    for d in ("a/keep", "b/x", "c", "d"):
        (low / d).mkdir(parents=True)
    (low / "a/keep/f").write_text("low")
    (low / "a/gone").write_text("low")
    (low / "b/x/y").write_text("low")
    (low / "c/old").write_text("low")
    (low / "d/sub").write_text("dir becomes file")
    (low / "hl").write_text("linked")
    os.link(low / "hl", low / "hl2")
    (up / "a").mkdir(parents=True)
    (up / "c").mkdir()
    (up / "a/.wh.gone").write_text("")
    (up / ".wh.b").write_text("")
    (up / "c/.wh..wh..opq").write_text("")
    (up / "c/new").write_text("up")
    (up / "c/+early").write_text("sorts before the opaque marker")
    (up / "d").write_text("now a file")
    (up / "hl").write_text("replaced")
    merged = stack([capture(low, store, chunker, hasher), capture(up, store, chunker, hasher)])
    paths = [e.path for e in merged]
    assert paths == [".", "a", "a/keep", "a/keep/f", "c", "c/+early", "c/new", "d", "hl", "hl2"]
    by = merged.by_path()
    assert by["d"].type == "file" and by["hl2"].type == "file"  # link to a replaced file
    out = tmp_path / "out"
    restore(merged, store, out, hasher)
    assert (out / "hl2").read_text() == "linked" and (out / "hl").read_text() == "replaced"
    assert (out / "a/keep/f").read_text() == "low" and (out / "c/new").read_text() == "up"
    bad = Manifest([filetree.Entry(".", "dir", 0o755, 0, 0, 0),
                    filetree.Entry("x", "hardlink", 0, 0, 0, 0, target="elsewhere")])
    with pytest.raises(ManifestError, match="outside its layer"):
        stack([bad])


@pytest.mark.slow
def test_debian_rootfs_round_trip(tmp_path, store, chunker, hasher):
    """A real debootstrap tree survives capture + restore byte- and metadata-identical."""
    try:
        from devtools.rootfs import debian_rootfs
        src = debian_rootfs()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no Debian rootfs available: {exc}")
    m = capture(src, store, chunker, hasher)
    assert len(m) > 5000 and any(e.type == "hardlink" for e in m)
    restore(Manifest.decode(m.encode()), store, tmp_path / "rootfs", hasher)
    assert diff_trees(src, tmp_path / "rootfs") == []
    if shutil.which("rsync"):  # an independent second opinion
        r = subprocess.run(["rsync", "-naHAX", "--checksum", "--itemize-changes",
                            f"{src}/", f"{tmp_path / 'rootfs'}/"],
                           capture_output=True, text=True, check=True)
        assert r.stdout == ""


def test_overlayfs_upper_dir_becomes_an_oci_layer(tmp_path, store, chunker, hasher):
    """Real overlayfs: what the kernel shows merged equals stack([lower, captured upper])."""
    low, up, work, mnt = (tmp_path / n for n in ("low", "up", "work", "mnt"))
    for d in (low / "keep", low / "gone-dir/sub", low / "opq", up, work, mnt):
        d.mkdir(parents=True)
    (low / "keep/a").write_text("a")
    (low / "gone-file").write_text("x")
    (low / "gone-dir/sub/f").write_text("f")
    (low / "opq/old").write_text("old")
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={low},upperdir={up},workdir={work}", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount overlayfs here: {r.stderr.strip()}")
    try:
        (mnt / "gone-file").unlink()
        shutil.rmtree(mnt / "gone-dir")
        shutil.rmtree(mnt / "opq")
        (mnt / "opq").mkdir()
        (mnt / "opq/new").write_text("new")
        (mnt / "keep/b").write_text("b")
        os.sync()
        upper = capture(up, store, chunker, hasher, overlay_upper=True)
        names = {e.path for e in upper}
        assert {".wh.gone-file", ".wh.gone-dir", "opq/.wh..wh..opq"} <= names
        merged = stack([capture(low, store, chunker, hasher), upper])
        restore(merged, store, tmp_path / "out", hasher)
        assert diff_trees(mnt, tmp_path / "out") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
