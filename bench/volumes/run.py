"""TinyVol volumes side by side with qcow2 (qemu-img / qemu-io), in one run.

    .venv/bin/python bench/volumes/run.py [--clones 100] [--workdir DIR]

Peers and what is measured:
- empty 10 GiB volume: TinyVol manifest bytes vs `qemu-img create -f qcow2 10G` file size.
- clone: `VolumeStore.clone` of a committed (ShareVol-backed) volume, in process, with
  and without fsyncs, vs `qemu-img create -f qcow2 -b base.qcow2 -F qcow2` (a whole
  process, which fdatasyncs); the `stellar vol clone` process time is printed too so
  the process-to-process pair is there.
- metadata per modified 64 KiB chunk: 1000 random 64 KiB writes into a clone of an
  empty 10 GiB volume; (manifest bytes - 64) / 1000 vs (qcow2 file bytes - data) / 1000.
- 1 GiB of random data into a clone, flushed: `Volume.write` + `flush` vs
  `qemu-io -c "write -s rand.bin 0 1G" -c flush` on a qcow2 overlay (same bytes).
- N clones of a Debian rootfs ext4 image (mkfs.ext4 -d), each with 10 MiB of private
  64 KiB writes: allocated bytes of NEBULA + manifests vs base.qcow2 + overlays.
  NEBULA lz4-compresses chunks when that saves a page; the qcow2 peer is uncompressed,
  so the base line is printed with both sizes. Private writes are random (incompressible)
  on our side; qcow2's size does not depend on the bytes written.
- Cosmic Packs on the same rootfs tree: unique chunks, bytes with 4 KiB alignment, and
  the NEBULA pack files on disk, with vs without packs.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from devtools.disk import allocated  # noqa: E402
from devtools.rootfs import debian_rootfs  # noqa: E402
from stellarium_core.hashing import Blake3Hasher  # noqa: E402
from stellarium_core.nebula import ChunkStore  # noqa: E402
from stellarium_core.plugins import Registry  # noqa: E402
from stellarium_core.volumes import filetree  # noqa: E402
from stellarium_core.volumes.volume import VolumeStore  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CS = 64 * KiB


def sh(*cmd: str | Path) -> float:
    t = time.perf_counter()
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)
    return time.perf_counter() - t


def row(what: str, ours: str, peer: str) -> None:
    print(f"  {what:<44} TinyVol {ours:>16}   qcow2 {peer:>16}")


def fresh(work: Path, name: str) -> tuple[VolumeStore, ChunkStore]:
    h = Blake3Hasher({})
    store = ChunkStore.open(work / name / "nebula", h, create=True)
    return VolumeStore(work / name / "volumes", store, h), store


def bench_small(work: Path) -> None:
    vols, store = fresh(work, "small")
    vols.create("empty", 10 * GiB).close()
    sh("qemu-img", "create", "-f", "qcow2", work / "empty.qcow2", "10G")
    row("empty 10 GiB volume (bytes)", str(vols.path("empty").stat().st_size),
        str((work / "empty.qcow2").stat().st_size))

    # clone of a committed volume (ShareVol base + empty delta)
    with vols.create("gold", 10 * GiB) as g:
        g.write(0, os.urandom(4 * MiB))
    vols.commit("gold")
    ours = []
    for i in range(200):
        t = time.perf_counter()
        vols.clone("gold", f"c{i}")
        ours.append(time.perf_counter() - t)
    peer = [sh("qemu-img", "create", "-f", "qcow2", "-b", work / "empty.qcow2", "-F", "qcow2",
               work / f"ov{i}.qcow2") for i in range(20)]
    row("clone (fsync'd), median (ms)", f"{statistics.median(ours) * 1e3:.3f}",
        f"{statistics.median(peer) * 1e3:.1f}")
    lazy = VolumeStore(vols.root, store, vols.hasher, durable=False)
    ours = []
    for i in range(200):
        t = time.perf_counter()
        lazy.clone("gold", f"n{i}")
        ours.append(time.perf_counter() - t)
    row("clone (no fsync), median (ms)", f"{statistics.median(ours) * 1e3:.3f}",
        f"{statistics.median(peer) * 1e3:.1f}")
    cfg = work / "host.toml"
    cfg.write_text(f'[store]\npath = "{work / "cli-store"}"\n')
    stellar = [sys.executable, "-m", "stellarium_core", "--config", str(cfg)]
    subprocess.run(stellar + ["host", "init"], check=True, capture_output=True)
    subprocess.run(stellar + ["vol", "create", "g", "10GiB"], check=True, capture_output=True)
    cli = [sh(*stellar, "vol", "clone", "g", f"k{i}") for i in range(5)]
    row("clone as a whole process, median (ms)", f"{statistics.median(cli) * 1e3:.1f}",
        f"{statistics.median(peer) * 1e3:.1f}")

    # metadata bytes per modified 64 KiB chunk
    rnd = random.Random(7)
    slots = rnd.sample(range(10 * GiB // CS), 1000)
    vols.create("meta", 10 * GiB).close()
    with vols.open("meta") as v:
        for s in slots:
            v.write(s * CS, rnd.randbytes(CS))
    ours_meta = (vols.path("meta").stat().st_size - 64) / len(slots)
    ov = work / "meta.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", ov, "10G")
    cmds = []
    for s in slots:
        cmds += ["-c", f"write -q -P {s % 255 + 1} {s * CS} {CS}"]
    sh("qemu-io", "-f", "qcow2", *cmds, ov)
    peer_meta = (ov.stat().st_size - len(slots) * CS) / len(slots)
    row("metadata per modified 64 KiB chunk (bytes)", f"{ours_meta:.1f}", f"{peer_meta:.1f}")

    # 1 GiB of random data into a clone, flushed
    rand = work / "rand.bin"
    with open(rand, "wb") as fh:
        for _ in range(GiB // (16 * MiB)):
            fh.write(os.urandom(16 * MiB))
    vols.clone("gold", "big")
    data = rand.read_bytes()
    t = time.perf_counter()
    with vols.open("big") as v:
        for off in range(0, GiB, MiB):
            v.write(off, memoryview(data)[off:off + MiB])
        v.flush()
    ours_t = time.perf_counter() - t
    del data
    bov = work / "big.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-b", work / "empty.qcow2", "-F", "qcow2", bov)
    peer_t = sh("qemu-io", "-f", "qcow2", "-c", f"write -q -s {rand} 0 1G", "-c", "flush", bov)
    row("write 1 GiB random into a clone + flush (s)", f"{ours_t:.2f}", f"{peer_t:.2f}")
    store.close()


def bench_rootfs(work: Path, clones: int) -> None:
    tree = debian_rootfs()
    img = work / "rootfs.raw"
    sh("mkfs.ext4", "-q", "-F", "-d", tree, img, "512M")
    vols, store = fresh(work, "fleet")
    vols.import_raw("debian", img).close()
    vols.commit("debian")
    base_ours = allocated(work / "fleet")
    base_q = work / "fleet-q" / "base.qcow2"
    base_q.parent.mkdir()
    sh("qemu-img", "convert", "-O", "qcow2", img, base_q)
    base_peer = allocated(base_q)
    row("Debian rootfs base, 512 MiB ext4 (MB)", f"{base_ours / 1e6:.1f}",
        f"{base_peer / 1e6:.1f}")
    rnd = random.Random(11)
    nslots = 512 * MiB // CS
    per = 10 * MiB // CS
    t_ours = t_peer = 0.0
    for i in range(clones):
        name = f"vm{i}"
        slots = rnd.sample(range(nslots), per)
        t = time.perf_counter()
        vols.clone("debian", name)
        with vols.open(name) as v:
            for s in slots:
                v.write(s * CS, os.urandom(CS))
        t_ours += time.perf_counter() - t
        ov = base_q.parent / f"{name}.qcow2"
        cmds = []
        for s in slots:
            cmds += ["-c", f"write -q -P {i % 255 + 1} {s * CS} {CS}"]
        t_peer += sh("qemu-img", "create", "-f", "qcow2", "-b", base_q, "-F", "qcow2", ov)
        t_peer += sh("qemu-io", "-f", "qcow2", *cmds, "-c", "flush", ov)
    total_ours, total_peer = allocated(work / "fleet"), allocated(base_q.parent)
    row(f"{clones} clones x 10 MiB private writes (MB)", f"{total_ours / 1e6:.1f}",
        f"{total_peer / 1e6:.1f}")
    row("  per clone above the base (MB)", f"{(total_ours - base_ours) / clones / 1e6:.2f}",
        f"{(total_peer - base_peer) / clones / 1e6:.2f}")
    row("  time to clone + write all clones (s)", f"{t_ours:.1f}", f"{t_peer:.1f}")
    store.close()


def bench_cosmic(work: Path) -> None:
    tree = debian_rootfs()
    chunker = Registry().create("chunker", "fastcdc", {})
    h = Blake3Hasher({})
    print("\nCosmic Packs on the Debian rootfs tree (FastCDC 16/64/256 KiB for larger files):")
    for packs in (True, False):
        with ChunkStore.open(work / f"cosmic-{packs}", h, create=True) as store:
            m = filetree.capture(tree, store, chunker, h, cosmic_packs=packs)
            fp = filetree.footprint(m, store)
            disk = allocated(work / f"cosmic-{packs}")
        label = "with Cosmic Packs   " if packs else "without Cosmic Packs"
        print(f"  {label} chunks {fp['chunks']:>6}  bytes {fp['bytes'] / 1e6:7.1f} MB  "
              f"in packs {fp['pack_bytes'] / 1e6:7.1f} MB  "
              f"NEBULA on disk (lz4) {disk / 1e6:7.1f} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clones", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    for tool in ("qemu-img", "qemu-io", "mkfs.ext4"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install qemu-utils e2fsprogs)")
            return 2
    work = Path(tempfile.mkdtemp(prefix="bench-volumes-", dir=args.workdir))
    try:
        ver = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True)
        print(f"TinyVol vs qcow2 (qemu-img/qemu-io {ver.stdout.split()[2]}; qemu-img create "
              f"fdatasyncs), workdir {work}")
        bench_small(work)
        bench_rootfs(work, args.clones)
        bench_cosmic(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
