"""One store for VMs and containers: what an image's VM form adds over its container form.

    .venv/bin/python bench/unify/run.py [--workdir DIR]

Input: the three real debootstrap trees of the ingest bench (``bench/ingest/run.py``
VARIANTS). For each tree, in one run, two fresh stores start from the same state:
the tree imported as a container image (FastCDC file chunks + Cosmic Packs, one
tree manifest). Then each adds the tree's VM form:

- stellar-erofs (ours): ``stellar image vmdisk``'s code path, an EROFS disk whose
  file data are the image's own chunks (TinyVol v2 extent map); only metadata is new.
- ext4-64k-grid (the peer, today's way): ``mkfs.ext4 -d TREE`` into a 512 MiB raw
  image, imported with ``stellar vol import`` (fixed 64 KiB grid, zero slots skipped).

added = new unique chunk bytes in NEBULA + the new manifest file (extent map or
TinyVol), over the container form = the image's unique chunk bytes + its tree
manifest. Both are raw (uncompressed) bytes, so lz4 does not flatter either side;
``chunks only`` leaves the manifests out of both. The goal is added_pct <= 5.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from devtools.rootfs import debian_rootfs  # noqa: E402
from stellarium_core.distribution import ImageStore, Importer  # noqa: E402
from stellarium_core.distribution.vmdisk import vm_disk  # noqa: E402
from stellarium_core.hashing import Blake3Hasher  # noqa: E402
from stellarium_core.nebula import ChunkStore  # noqa: E402
from stellarium_core.plugins import Registry  # noqa: E402
from stellarium_core.volumes.imagedisk import ImageDisks  # noqa: E402
from stellarium_core.volumes.volume import VolumeStore  # noqa: E402

GOAL_PCT = 5.0
OURS, PEER = "stellar-erofs", "ext4-64k-grid"


def ingest_variants() -> list[tuple[str, ...]]:
    """The ingest bench's trees, from its own module (one list, not a copy)."""
    spec = importlib.util.spec_from_file_location("bench_ingest", ROOT / "bench/ingest/run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [tuple(v) for v in mod.VARIANTS]


def container_form(work: Path, tree: Path) -> tuple[ChunkStore, ImageStore, int]:
    """A fresh store holding ``tree`` as image 'img'; (store, images, container bytes)."""
    hasher = Blake3Hasher({})
    store = ChunkStore.open(work / "nebula", hasher, create=True)
    images = ImageStore(work / "images", store, hasher)
    digest = Importer(images, Registry().create("chunker", "fastcdc", {}), hasher) \
        .import_path(tree, "img")
    manifests = sum(images.path(d).stat().st_size for d in images.image(digest).layers)
    return store, images, store.stats()["unique_bytes"] + manifests


def ours(work: Path, tree: Path) -> dict:
    store, images, base = container_form(work, tree)
    with store:
        chunks0 = store.stats()["unique_bytes"]
        disks = ImageDisks(work / "disks", store, images.hasher)
        t0 = time.perf_counter()
        res = vm_disk(images, disks, "img")
        secs = time.perf_counter() - t0
        new = store.stats()["unique_bytes"] - chunks0
        manifest = disks.path(res.image).stat().st_size
    return {"base": base, "chunks_base": chunks0, "new_chunks": new, "manifest": manifest,
            "build_s": secs, "disk_bytes": res.disk.size}


def peer(work: Path, tree: Path) -> dict:
    store, images, base = container_form(work, tree)
    with store:
        chunks0 = store.stats()["unique_bytes"]
        img = work / "root.ext4"
        t0 = time.perf_counter()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(img), "512M"],
                       check=True, capture_output=True)
        vols = VolumeStore(work / "volumes", store, images.hasher)
        vols.import_raw("root", img).close()
        secs = time.perf_counter() - t0
        new = store.stats()["unique_bytes"] - chunks0
        manifest = vols.path("root").stat().st_size
    return {"base": base, "chunks_base": chunks0, "new_chunks": new, "manifest": manifest,
            "build_s": secs, "disk_bytes": img.stat().st_size}


def pct(r: dict) -> tuple[float, float]:
    """(added % with manifests, added % of chunk bytes only)."""
    return (100 * (r["new_chunks"] + r["manifest"]) / r["base"],
            100 * r["new_chunks"] / r["chunks_base"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("mkfs.ext4") is None:
        print("mkfs.ext4 is not installed (apt-get install e2fsprogs); cannot compare")
        return 2
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} "
          f"(1/5/15 min, {os.cpu_count()} cores)")
    results: dict[str, dict[str, dict]] = {OURS: {}, PEER: {}}
    for variant in ingest_variants():
        name = "minbase" + "".join(f"+{p}" for p in variant)
        tree = debian_rootfs(variant)
        for system, fn in ((OURS, ours), (PEER, peer)):
            work = Path(tempfile.mkdtemp(prefix="bench-unify-", dir=args.workdir))
            try:
                results[system][name] = fn(work, tree)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(f"{'tree':<38} {'system':<14} {'image MB':>9} {'added MB':>9} {'manifest KB':>11} "
          f"{'added %':>8} {'chunks only %':>13} {'build s':>8}")
    summary: dict[str, dict[str, float]] = {}
    trees: dict[str, dict[str, dict[str, float]]] = {}
    for system, per_tree in results.items():
        for name, r in per_tree.items():
            with_m, chunks_only = pct(r)
            trees.setdefault(name, {})[system] = {
                "added_pct": round(with_m, 3), "added_chunks_pct": round(chunks_only, 3),
                "added_mib": round((r["new_chunks"] + r["manifest"]) / 2**20, 3),
                "build_s": round(r["build_s"], 3)}
            print(f"{name:<38} {system:<14} {r['base'] / 1e6:9.1f} "
                  f"{(r['new_chunks'] + r['manifest']) / 1e6:9.2f} {r['manifest'] / 1e3:11.1f} "
                  f"{with_m:8.2f} {chunks_only:13.2f} {r['build_s']:8.2f}")
        worst = max(trees[n][system]["added_pct"] for n in per_tree)
        summary[system] = {"added_pct": worst,
                           "added_mib": round(sum(trees[n][system]["added_mib"]
                                                  for n in per_tree), 3),
                           "build_s": round(sum(r["build_s"] for r in per_tree.values()), 3)}
    met = summary[OURS]["added_pct"] <= GOAL_PCT
    print(f"goal: the VM form adds at most {GOAL_PCT}% over the container form -> "
          f"worst tree {summary[OURS]['added_pct']:.2f}% ({'met' if met else 'NOT met'}); "
          f"today's way adds {summary[PEER]['added_pct']:.1f}%")
    print(json.dumps({"bench": "unify", "peer": PEER, "systems": summary,
                      "higher_is_better": {"added_pct": False, "added_mib": False,
                                           "build_s": False},
                      "trees": trees, "goal_added_pct": GOAL_PCT, "goal_met": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
