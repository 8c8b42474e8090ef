"""Pull over HTTP: bytes on the wire and wall time, Stellarium vs ``casync extract``.

    .venv/bin/python bench/pull/run.py [--workdir DIR] [--workers N]

Images: two real debootstrap minbase bookworm trees from ``devtools.rootfs``: A
(plain) and B (A + python3-minimal). B is published both ways into one static
site served by nginx on loopback (1 worker, access log of body bytes, so the
wire bytes are counted by the server, the same way for both tools):

- Stellarium: ``stellar publish`` layout, pulled with ``Puller`` (the code behind
  ``stellar pull``), N parallel keep-alive GETs, every blob verified; "gz" is the
  same with ``publish --gzip`` and nginx ``gzip_static`` (gzip on the wire).
- casync: ``casync make`` store + .caidx (zstd chunks), ``casync extract`` over HTTP.

Two cases each: into an empty store, and into one that already holds sibling A
(Stellarium: A pulled first; casync: ``--seed=A``, its way to reuse local data).
"Ideal" is the raw size of B's chunks that A lacks: what a perfect sibling pull
of uncompressed chunks must move. Stellarium's figures include storing and
reference-counting in NEBULA; casync's include writing out the tree.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from devtools.nginx import Nginx  # noqa: E402
from devtools.rootfs import debian_rootfs  # noqa: E402
from stellarium_core.distribution import ImageStore, Importer, Puller, publish  # noqa: E402
from stellarium_core.hashing import Blake3Hasher  # noqa: E402
from stellarium_core.nebula import ChunkStore  # noqa: E402
from stellarium_core.plugins import Registry  # noqa: E402
from stellarium_core.volumes import filetree  # noqa: E402

MB = 1e6


def store_at(path: Path, hasher: Blake3Hasher) -> ImageStore:
    return ImageStore(path / "images", ChunkStore.open(path / "nebula", hasher, create=True),
                      hasher)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args()
    for tool in ("nginx", "casync"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/pull: {tool} is not installed (see make.py APT_PACKAGES)")
    a, b = debian_rootfs(), debian_rootfs(("python3-minimal",))
    work = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.workdir))
    hasher = Blake3Hasher({})
    chunker = Registry().create("chunker", "fastcdc", {})
    try:
        site = work / "site"
        pub = store_at(work / "publisher", hasher)
        imp = Importer(pub, chunker, hasher)
        imp.import_path(a, "A")
        imp.import_path(b, "B")
        publish(pub, "A", site / "stellar")
        publish(pub, "B", site / "stellar")
        publish(pub, "A", site / "stellar-gz", gzip=True)
        publish(pub, "B", site / "stellar-gz", gzip=True)
        refs_a = set().union(*(filetree.references(pub.layer(d)) for d in pub.image("A").layers))
        refs_b = set().union(*(filetree.references(pub.layer(d)) for d in pub.image("B").layers))
        ideal = sum(pub.store.size(d) for d in refs_b - refs_a)
        full = sum(pub.store.size(d) for d in refs_b)
        (site / "casync").mkdir(parents=True)
        subprocess.run(["casync", "make", f"--store={site}/casync/store.castr",
                        f"{site}/casync/b.caidx", str(b)], check=True, capture_output=True)
        pub.store.close()

        web = Nginx(site, work, log_bytes=True)
        rows = []
        try:
            for case in ("empty", "sibling A"):
                for variant, label in (("stellar", "stellar pull"),
                                       ("stellar-gz", "stellar pull gz")):
                    dst = store_at(work / f"{variant}-{case[0]}", hasher)
                    url = f"{web.url}{variant}/"
                    if case != "empty":
                        Puller(dst, url, workers=args.workers, progress=False).pull("A", tag="A")
                    m = web.mark()
                    t0 = time.perf_counter()
                    res = Puller(dst, url, workers=args.workers, progress=False).pull("B", tag="B")
                    dt = time.perf_counter() - t0
                    reqs, nbytes = web.since(m)
                    rows.append((label, case, nbytes, reqs, dt,
                                 f"{res.blobs_fetched}/{res.blobs_needed} blobs"))
                    dst.store.close()

                out = work / f"casync-{case[0]}"
                seed = [f"--seed={a}"] if case != "empty" else []
                m = web.mark()
                t0 = time.perf_counter()
                subprocess.run(["casync", "extract", f"--store={web.url}casync/store.castr",
                                *seed, f"{web.url}casync/b.caidx", str(out)],
                               check=True, capture_output=True)
                dt = time.perf_counter() - t0
                reqs, nbytes = web.since(m)
                rows.append(("casync extract", case, nbytes, reqs, dt, "zstd chunks"))
        finally:
            web.stop()

        print(f"image B = minbase bookworm + python3-minimal: {len(refs_b)} blobs, "
              f"{full / MB:.1f} MB raw; {len(refs_b - refs_a)} blobs "
              f"({ideal / MB:.1f} MB raw) not in sibling A")
        print(f"{'tool':16} {'into':10} {'MB on wire':>11} {'requests':>9} {'seconds':>8}  note")
        for tool, case, nbytes, reqs, dt, note in rows:
            print(f"{tool:16} {case:10} {nbytes / MB:11.1f} {reqs:9d} {dt:8.2f}  {note}")
        print(f"{'ideal (raw)':16} {'sibling A':10} {ideal / MB:11.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
