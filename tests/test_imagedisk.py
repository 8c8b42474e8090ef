"""The VM form of an image: an EROFS disk over the image's own chunks (TinyVol v2 extent
map), read by the real kernel, checked by fsck.erofs, refcounted with the image."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stellarium_core.distribution import ImageStore, Importer
from stellarium_core.distribution.images import ImageManifest
from stellarium_core.distribution.vmdisk import prune_vm_disks, sharing, vm_disk
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes import filetree, tinyvol
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.erofs import ErofsError
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.tinyvol import Extent, ExtentMap, ManifestError
from stellarium_core.volumes.volume import VolumeError, VolumeStore
from tests.blockpath import mounted, served
from tests.helpers import new_store, run_cli, stellar_json

ROOT = os.geteuid() == 0


@pytest.fixture
def images(tmp_path, store, hasher) -> ImageStore:
    return ImageStore(tmp_path / "images", store, hasher)


@pytest.fixture
def disks(tmp_path, store, hasher) -> ImageDisks:
    return ImageDisks(tmp_path / "disks", store, hasher)


def make_tree(root: Path, rng: random.Random) -> Path:
    """Every kind of entry EROFS holds, plus the edge cases of its layout."""
    (root / "etc/deep/er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "etc/debian_version").write_text("12.99\n")
    (root / "etc/empty").write_bytes(b"")
    (root / "etc/page").write_bytes(rng.randbytes(4096))             # exactly a block
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/big").write_bytes(rng.randbytes(900_000))       # many FastCDC chunks
    (root / "usr/bin/zeros").write_bytes(bytes(300_000))
    (root / "usr/bin/big-link").hardlink_to(root / "usr/bin/big")
    (root / "usr/bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "usr/bin/suid", 0o4755)
    os.symlink("../usr/bin/big", root / "etc/short-link")
    os.symlink("x" * 3000, root / "etc/long-link")                   # not inline next to 64 B
    many = root / "many"                                             # a directory of blocks
    many.mkdir()
    for i in range(400):
        (many / f"{i:04d}-{'n' * rng.randrange(1, 120)}").write_bytes(rng.randbytes(i % 7))
    os.setxattr(root / "etc/debian_version", "user.origin", b"test")
    os.setxattr(root / "etc", "trusted.note", rng.randbytes(300))
    os.mkfifo(root / "etc/fifo")
    if ROOT:
        os.mknod(root / "etc/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "etc/disk", stat.S_IFBLK | 0o660, os.makedev(259, 70000))
        os.chown(root / "etc/deep", 1234, 5678)
    for i, p in enumerate(sorted(root.rglob("*"), reverse=True)):
        os.utime(p, ns=(0, 1_600_000_000_123_456_789 - i * 999_999_937), follow_symlinks=False)
    return root


def import_tree(images: ImageStore, chunker, hasher, tree: Path, name: str = "t") -> bytes:
    return Importer(images, chunker, hasher).import_path(tree, name)


def fsck(image: Path) -> None:
    if shutil.which("fsck.erofs") is None:
        pytest.skip("fsck.erofs is not installed (apt-get install erofs-utils)")
    r = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# -- the extent map format ---------------------------------------------------------------


def test_extent_map_round_trips_and_refuses_damage():
    d1, d2 = bytes(range(32)), bytes(range(1, 33))
    disk = ExtentMap(size=1 << 20, image=b"\7" * 32,
                     extents=[Extent(0, d1, 0, 100), Extent(4096, d2, 70_000, 200_000)])
    data = disk.encode()
    assert len(data) == 64 + 2 * 48
    assert tinyvol.decode_extents(data) == disk
    with pytest.raises(ManifestError, match="image disk"):
        tinyvol.decode(data)                      # a v2 map is not a grid volume
    grid = tinyvol.TinyVol(size=1 << 20).encode()
    with pytest.raises(ManifestError, match="grid volume"):
        tinyvol.decode_extents(grid)
    with pytest.raises(ManifestError, match="truncated"):
        tinyvol.decode_extents(data[:-1])
    flipped = bytearray(data)
    flipped[100] ^= 1
    with pytest.raises(ManifestError, match="checksum"):
        tinyvol.decode_extents(bytes(flipped))
    for bad in ([Extent(4096, d1, 0, 10), Extent(0, d2, 0, 10)],      # out of order
                [Extent(0, d1, 0, 5000), Extent(4096, d2, 0, 10)],    # overlapping
                [Extent((1 << 20) - 5, d1, 0, 10)]):                  # past the end
        with pytest.raises(ManifestError):
            ExtentMap(size=1 << 20, image=b"\7" * 32, extents=bad).encode()


# -- reads -----------------------------------------------------------------------------


def test_reads_cross_extents_gaps_and_sectors(tmp_path, images, disks, store, chunker, hasher):
    rng = random.Random(1)
    digest = import_tree(images, chunker, hasher, make_tree(tmp_path / "tree", rng))
    res = vm_disk(images, disks, "t")
    assert res.image == digest and res.built
    # The reference: the same disk assembled independently from whole chunks.
    want = bytearray(res.disk.size)
    for x in res.disk.extents:
        want[x.offset:x.end] = store.get(x.digest)[x.chunk_offset:x.chunk_offset + x.length]
    with disks.open(digest) as disk:
        assert disk.read(0, disk.size) == want
        for _ in range(300):
            off = rng.randrange(disk.size)
            n = rng.randrange(min(300_000, disk.size - off) + 1)
            assert disk.read(off, n) == want[off:off + n]
        dev = BlockDevice(disk)
        assert dev.readonly and dev.sectors * SECTOR == disk.size
        sector = res.disk.extents[-1].offset // SECTOR
        assert b"".join(dev.read_views(sector, 64)) == want[sector * SECTOR:(sector + 64) * SECTOR]
        with pytest.raises(VolumeError, match="read-only"):
            dev.write(0, bytes(SECTOR))
        with pytest.raises(VolumeError, match="read-only"):
            dev.discard(0, 1)
        dev.flush()                               # nothing to flush, and no error
        with pytest.raises(VolumeError, match="outside"):
            disk.read(disk.size - 1, 2)


def test_reads_are_zero_copy_over_uncompressed_chunks(tmp_path, hasher, chunker):
    with ChunkStore.open(tmp_path / "raw", hasher, create=True, compression="none") as st:
        images = ImageStore(tmp_path / "images", st, hasher)
        disks = ImageDisks(tmp_path / "disks", st, hasher)
        tree = tmp_path / "tree"
        tree.mkdir()
        (tree / "f").write_bytes(random.Random(2).randbytes(200_000))
        import_tree(images, chunker, hasher, tree)
        res = vm_disk(images, disks, "t")
        data = next(x for x in res.disk.extents if x.offset >= 8192)
        with disks.open(res.image) as disk:
            views = list(disk.views(data.offset, data.length))
            assert len(views) == 1 and views[0].obj.__class__.__name__ == "mmap"


# -- the real kernel and fsck.erofs ----------------------------------------------------------


def test_vm_form_mounts_identical_to_the_tree(tmp_path, images, disks, chunker, hasher):
    tree = make_tree(tmp_path / "tree", random.Random(3))
    digest = import_tree(images, chunker, hasher, tree)
    res = vm_disk(images, disks, "t")
    assert res.added_bytes > 0 and res.added_bytes < 64 * 1024 * 4  # metadata only
    disks.export_raw(digest, tmp_path / "disk.img")
    fsck(tmp_path / "disk.img")
    with mounted(tmp_path / "disk.img", tmp_path / "mnt") as mnt:
        assert filetree.diff_trees(tree, mnt) == []
        assert os.stat(mnt / "usr/bin/big").st_nlink == 2


@pytest.mark.slow
def test_debian_image_vm_form_through_a_real_block_path(tmp_path):
    """A real debootstrap tree imported as an image: its VM form adds < 5% new bytes,
    fsck.erofs passes, and the kernel reads it through loop over FUSE over ImageDisk
    file-for-file identical to the tree."""
    try:
        from devtools.rootfs import debian_rootfs
        src = debian_rootfs()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no Debian rootfs available: {exc}")
    cfg = new_store(tmp_path)
    stellar_json(cfg, "image", "import", src, "debian", timeout=600)
    before = stellar_json(cfg, "stats")["unique_bytes"]
    out = stellar_json(cfg, "image", "vmdisk", "debian", "--export", tmp_path / "d.img")
    added = stellar_json(cfg, "stats")["unique_bytes"] - before
    assert out["built"] and added == out["added_bytes"]
    assert 0 < added < 0.05 * out["image_bytes"], out
    fsck(tmp_path / "d.img")
    with served(cfg, "debian", tmp_path / "mnt") as mnt:
        assert (mnt / "etc/debian_version").read_bytes() == \
            (src / "etc/debian_version").read_bytes()
        assert filetree.diff_trees(src, mnt) == []


# -- reference counting, pruning, the CLI ------------------------------------------------------


def test_disk_is_cached_refcounted_and_pruned(tmp_path, images, disks, store, chunker, hasher):
    tree = make_tree(tmp_path / "tree", random.Random(4))
    digest = import_tree(images, chunker, hasher, tree)
    first = vm_disk(images, disks, "t")
    again = vm_disk(images, disks, digest.hex())          # by digest: the same disk
    assert first.built and not again.built and again.disk == first.disk
    refs = {d: store.refs(d) for d in first.disk.digests()}
    assert all(n >= 1 for n in refs.values())
    with disks.open(digest) as disk:                      # a running VM holds it open
        images.remove("t")
        assert prune_vm_disks(images, disks) == []
        assert disks.has(digest)
        store.gc()
        assert disk.read(0, disk.size)                    # still all there
    assert prune_vm_disks(images, disks) == [digest]
    assert not disks.has(digest)
    store.gc()
    assert len(store) == 0


def test_cli_vmdisk_stats_rm_gc(tmp_path):
    tree = make_tree(tmp_path / "tree", random.Random(5))
    cfg = new_store(tmp_path / "host")
    stellar_json(cfg, "image", "import", tree, "a")
    stellar_json(cfg, "image", "import", tree, "b")      # same content: one disk serves both
    out = stellar_json(cfg, "image", "vmdisk", "a")
    assert out["built"] and out["added_pct"] < 100 and Path(out["path"]).exists()
    assert not stellar_json(cfg, "image", "vmdisk", "b")["built"]
    share = stellar_json(cfg, "stats")["sharing"]
    assert share["vm_disks"] == 1 and share["shared_chunks"] == share["image_chunks"] > 0
    assert share["vm_only_bytes"] == out["added_bytes"]
    r = run_cli(["--config", cfg, "stats"])
    assert r.returncode == 0 and "shared_bytes" in r.stdout
    stellar_json(cfg, "image", "rm", "a")
    assert Path(out["path"]).exists()                     # "b" still binds the image
    assert stellar_json(cfg, "image", "rm", "b")["vm_disks_removed"] == 1
    stellar_json(cfg, "gc")
    assert stellar_json(cfg, "stats")["chunks"] == 0
    r = run_cli(["--config", cfg, "image", "vmdisk", "a"])
    assert r.returncode == 1 and "no image named 'a'" in r.stderr


# -- bad input ---------------------------------------------------------------------------------


def bind(images: ImageStore, entries: list[filetree.Entry], name: str = "bad") -> None:
    """Bind a hand-made (hostile) single-layer image, as a pull from a CDN could."""
    layer = filetree.Manifest(entries)
    data = layer.encode()
    digest = images.hasher.digest(data)
    with images.locked():
        (images.manifests / f"{digest.hex()}.json").write_bytes(data)
        images.bind(name, ImageManifest([digest]))


def root_entry() -> filetree.Entry:
    return filetree.Entry(".", "dir", 0o755, 0, 0, 0)


@pytest.mark.parametrize("entry, reason", [
    (filetree.Entry("f", "file", 0o644, 0, 0, 0, xattrs={"btrfs.compression": b"zstd"}),
     "namespace"),
    (filetree.Entry("f", "file", 0o644, 0, 0, 0, xattrs={"user.x": bytes(5000)}),
     "xattrs take"),
    (filetree.Entry("n" * 300, "file", 0o644, 0, 0, 0), "name is 300 bytes"),
    (filetree.Entry("dev", "char", 0o644, 0, 0, 0, rdev=os.makedev(5000, 1)), "32-bit dev_t"),
    (filetree.Entry("l", "symlink", 0o777, 0, 0, 0, target="t" * 5000), "symlink target"),
    (filetree.Entry("h", "hardlink", 0o644, 0, 0, 0, target="."), "hardlink target"),
    (filetree.Entry("a/b", "file", 0o644, 0, 0, 0), "parent directory"),
    (filetree.Entry("f", "file", 0o644, 1 << 33, 0, 0), "out of range"),
    (filetree.Entry("f", "file", 0o644, 0, 0, 0, size=10, chunks=[(b"\1" * 32, 10)]),
     "not in the store"),
])
def test_unbuildable_image_names_the_entry(images, disks, store, entry, reason):
    bind(images, [root_entry(), entry])
    chunks = len(store)
    with pytest.raises(ErofsError, match=f"entry {entry.path!r}.*{reason}"):
        vm_disk(images, disks, "bad")
    assert disks.images() == [] and len(store) == chunks  # nothing kept, nothing leaked


def test_cli_says_which_entry_is_unbuildable(tmp_path):
    cfg = new_store(tmp_path / "host")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "ok").write_text("fine")
    stellar_json(cfg, "image", "import", tree, "img")
    host_images = tmp_path / "host/store/images"
    index = json.loads((host_images / "index.json").read_text())
    digest = bytes.fromhex(index["images"]["img"])
    from stellarium_core.host import Host

    host = Host.from_config(cfg)
    images = ImageStore.for_host(host)
    layer = images.flatten(digest)
    layer.entries[1].xattrs = {"system.nfs4_acl": b"\0"}
    bind(images, layer.entries, "img")
    host.store.close()
    r = run_cli(["--config", cfg, "image", "vmdisk", "img"])
    assert r.returncode == 1, r.stderr
    assert "entry 'ok'" in r.stderr and "system.nfs4_acl" in r.stderr
    assert "Traceback" not in r.stderr


def test_damaged_disk_manifest_is_refused(tmp_path, images, disks, chunker, hasher):
    tree = make_tree(tmp_path / "tree", random.Random(6))
    digest = import_tree(images, chunker, hasher, tree)
    vm_disk(images, disks, "t")
    p = disks.path(digest)
    data = bytearray(p.read_bytes())
    data[200] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="checksum"):
        disks.open(digest)
    other = disks.path(b"\5" * 32)
    other.write_bytes(tinyvol.encode_extents(ExtentMap(size=4096, image=digest)))
    with pytest.raises(ManifestError, match="another image"):
        disks.open(b"\5" * 32)


def test_volumes_and_disks_share_counted(tmp_path, images, disks, store, chunker, hasher):
    tree = make_tree(tmp_path / "tree", random.Random(7))
    import_tree(images, chunker, hasher, tree)
    vols = VolumeStore(tmp_path / "vols", store, hasher)
    with vols.create("scratch", 1 << 20) as v:
        v.write(0, b"x" * 4096)
    assert sharing(images, vols, disks)["vm_disks"] == 0
    res = vm_disk(images, disks, "t")
    share = sharing(images, vols, disks)
    assert share["vm_disks"] == 1 and share["volumes"] == 1
    assert share["vm_only_bytes"] == res.added_bytes + 65536   # the scratch volume's slot
    assert share["shared_bytes"] == share["image_bytes"] == res.image_bytes
