"""Random trees and random (hostile) manifests through the EROFS builder (hypothesis).

Every tree a directory can hold must come back from the kernel's EROFS file-for-file;
every manifest either builds into a filesystem fsck.erofs accepts or is refused with
an ErofsError that names one of its entries."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stellarium_core.distribution import ImageStore, Importer
from stellarium_core.distribution.vmdisk import vm_disk
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes import erofs, filetree
from stellarium_core.volumes.imagedisk import ImageDisks
from tests.blockpath import mounted, need_erofs_mount

NAME = st.lists(st.integers(1, 255).filter(lambda c: c != ord("/")), min_size=1,
                max_size=255).map(bytes).filter(lambda b: b not in (b".", b".."))
XATTR_NAME = st.sampled_from(["user.", "trusted.", "security.", "user.a.b."]).flatmap(
    lambda p: st.text("abcdefghij_-.0123456789", min_size=1, max_size=40).map(lambda s: p + s))
MTIME = st.integers(min_value=0, max_value=4_000_000_000 * 10**9)


def _file() -> st.SearchStrategy:
    size = st.one_of(st.just(0), st.integers(1, 4095), st.integers(4096, 400_000))
    return st.tuples(st.just("file"), size, st.integers(0, 255))


_LEAF = st.one_of(_file(), st.tuples(st.just("symlink"), st.binary(min_size=1, max_size=4095)
                                     .filter(lambda b: b"\0" not in b)),
                  st.tuples(st.just("fifo")), st.tuples(st.just("hardlink")))
TREE = st.recursive(
    st.dictionaries(NAME, _LEAF, max_size=6),
    lambda kids: st.dictionaries(NAME, st.one_of(_LEAF, kids), max_size=8), max_leaves=40)
META = st.tuples(st.sampled_from([0o755, 0o700, 0o4755, 0o644, 0o1777, 0o600]), MTIME,
                 st.dictionaries(XATTR_NAME, st.binary(max_size=200), max_size=3))


def _write(root: Path, tree: dict, metas: list, files: list[Path]) -> None:
    for name, node in sorted(tree.items()):
        p = root / os.fsdecode(name)
        if isinstance(node, dict):
            p.mkdir()
            _write(p, node, metas, files)
        elif node[0] == "file":
            p.write_bytes(bytes([node[2]]) * (node[1] // 2) + os.urandom(node[1] - node[1] // 2))
            files.append(p)
        elif node[0] == "symlink":
            os.symlink(node[1], p)
        elif node[0] == "fifo":
            os.mkfifo(p)
        elif files:
            os.link(files[len(files) // 2], p)
        else:
            continue
        mode, mtime, xattrs = metas[len(files) % len(metas)]
        fmt = stat.S_IFMT(os.lstat(p).st_mode)
        if fmt != stat.S_IFLNK and (fmt != stat.S_IFDIR or mode & 0o700 == 0o700):
            os.chmod(p, mode)
        if fmt in (stat.S_IFREG, stat.S_IFDIR):   # user.* xattrs live on files and dirs only
            for k, v in xattrs.items():
                os.setxattr(p, k, v)
        os.utime(p, ns=(mtime, mtime), follow_symlinks=False)


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=TREE, metas=st.lists(META, min_size=1, max_size=4))
def test_random_trees_come_back_from_the_kernel(tree, metas, hasher, chunker):
    need_erofs_mount()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        t = Path(tmp)
        (t / "tree").mkdir()
        _write(t / "tree", tree, metas, [])
        with ChunkStore.open(t / "nebula", hasher, create=True) as store:
            images = ImageStore(t / "images", store, hasher)
            disks = ImageDisks(t / "disks", store, hasher)
            Importer(images, chunker, hasher).import_path(t / "tree", "t")
            res = vm_disk(images, disks, "t")
            disks.export_raw(res.image, t / "disk.img")
            with mounted(t / "disk.img", t / "mnt") as mnt:
                assert filetree.diff_trees(t / "tree", mnt) == []


HOSTILE = ("uid", "name", "xattr", "xattr-size", "rdev", "symlink", "hardlink")


@st.composite
def manifests(draw) -> list[filetree.Entry]:
    """A random manifest: well-formed entries, about one in twenty made hostile."""
    out = [filetree.Entry(".", "dir", 0o755, 0, 0, 0)]
    dirs = ["."]
    kinds = ["dir", "file", "symlink", "char", "block", "fifo", "socket", "hardlink"]
    for _ in range(draw(st.integers(0, 40))):
        parent = draw(st.sampled_from(dirs))
        hostile = draw(st.sampled_from(HOSTILE)) if draw(st.integers(0, 19)) == 13 else None
        name = b"L" * draw(st.integers(256, 300)) if hostile == "name" else draw(NAME)
        path = os.fsdecode(name) if parent == "." else f"{parent}/{os.fsdecode(name)}"
        if any(e.path == path for e in out):
            continue
        kind = draw(st.sampled_from(kinds))
        e = filetree.Entry(path, kind, draw(st.sampled_from([0o644, 0o755, 0o7777])),
                           draw(st.sampled_from([0, 1000, (1 << 32) - 1])), 0,
                           draw(st.integers(-(10**18), 10**19)),
                           xattrs=draw(st.dictionaries(XATTR_NAME, st.binary(max_size=100),
                                                       max_size=3)))
        if kind == "dir":
            dirs.append(path)
        elif kind == "file":
            e.size = draw(st.integers(0, 300_000))
        elif kind == "symlink":
            e.target = "x" * draw(st.integers(1, 4095))
        elif kind in ("char", "block"):
            e.rdev = os.makedev(draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
        elif kind == "hardlink":
            targets = [x.path for x in out if x.type not in ("dir", "hardlink")]
            if not targets:
                continue
            e.target = draw(st.sampled_from(targets))
        if hostile == "uid":
            e.uid = 1 << 32
        elif hostile == "xattr":
            e.xattrs[draw(st.text(max_size=20))] = b"v"
        elif hostile == "xattr-size":
            e.xattrs["user.big"] = bytes(5000)
        elif hostile == "rdev" and kind in ("char", "block"):
            e.rdev = os.makedev(4096, 1)
        elif hostile == "symlink" and kind == "symlink":
            e.target = "y" * 4096
        elif hostile == "hardlink" and kind == "hardlink":
            e.target = "."
        out.append(e)
    return out


@settings(max_examples=150, deadline=None)
@given(entries=manifests())
def test_random_manifests_build_clean_or_name_an_entry(entries):
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs is not installed (apt-get install erofs-utils)")
    m = filetree.Manifest(entries)
    try:
        layout = erofs.build(m, lambda e: [(b"\1" * 32, 0, e.size)] if e.size else [])
    except erofs.ErofsError as exc:
        assert any(str(exc).startswith(f"entry {e.path!r}: ") for e in entries), str(exc)
        event("refused")
        return
    event("built")
    offsets = [x[0] for x in layout.extents]
    assert offsets == sorted(offsets) and len(layout.meta) <= layout.size
    assert all(off >= len(layout.meta) and off + n <= layout.size
               for off, _, _, n in layout.extents)
    with tempfile.NamedTemporaryFile(dir="/var/tmp", suffix=".erofs") as fh:
        fh.write(layout.meta)
        fh.truncate(layout.size)
        fh.flush()
        r = subprocess.run(["fsck.erofs", fh.name], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
