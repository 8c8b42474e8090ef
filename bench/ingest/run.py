"""Ingest speed and stored bytes: NEBULA vs ``casync make`` vs ``borg create``, one run.

    .venv/bin/python bench/ingest/run.py [--runs 3] [--workdir DIR] [--profile OUT.html]

Input: three real debootstrap minbase bookworm trees (plain, +python3-minimal,
+curl/ca-certificates) from ``devtools.rootfs``, read again before every tool's run
so every tool starts from the same warm page cache (``borg create`` drops the files
it has read from the cache, with ``POSIX_FADV_DONTNEED``: the tool after it read
them from disk). Each tool ingests all three into one fresh store/repo on the same
filesystem, with its defaults:

- ``stellar``: ``stellar ingest``'s code path in process (FastCDC 16/64/256 KiB,
  files under 16 KiB in Cosmic Packs, BLAKE3, lz4, fsync'd packs and index; one
  worker process per core cuts, packs, hashes and compresses the new chunks), the
  default host config;
- ``stellar-zstd``: the same with ``[compressor] name = "zstd"`` (the zstd plugin);
- ``casync``: ``casync make``, one ``.caidx`` per tree into one store (FastCDC-like
  64 KiB avg, SHA-512/256, zstd);
- ``borg``: ``borg create``, three archives in one unencrypted repo (buzhash
  512K/2M/8M, lz4).

Every round runs every tool once, interleaved, and prints each one's wall and CPU
seconds (user+sys of its processes) with the 1-minute load average before it: the
machine has 2 cores and may be shared. The goals are checked per round (the worst
round counts): NEBULA's wall time at least 3x casync's and 2x borg's, and its
stored bytes at most borg's. "disk" is what the store/repo occupies afterwards
(allocated blocks, every file of it). Dedup ratio is the bytes each tool chunked over
the unique chunk bytes it kept, before compression. The ceiling line is FastCDC +
BLAKE3 over the same bytes already in memory, on one core (no I/O, no index). The
last section measures the in-memory index at 1M chunks with tracemalloc, and the
CPU time to open a 1M-chunk store from its log and from an index snapshot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402

from devtools.disk import allocated  # noqa: E402
from devtools.rootfs import debian_rootfs  # noqa: E402
from stellarium_core.hashing import Blake3Hasher  # noqa: E402
from stellarium_core.nebula import ChunkStore  # noqa: E402
from stellarium_core.nebula.format import PUT, log_record  # noqa: E402
from stellarium_core.nebula.ingest import ingest  # noqa: E402
from stellarium_core.nebula.table import ChunkTable  # noqa: E402
from stellarium_core.plugins import Registry  # noqa: E402

VARIANTS = [(), ("python3-minimal",), ("curl", "ca-certificates")]
MB = 1e6


def regular_files(trees: list[Path]) -> list[Path]:
    out = []
    for t in trees:
        for dirpath, _, files in os.walk(t):
            for f in files:
                p = Path(dirpath, f)
                if p.is_file() and not p.is_symlink():
                    out.append(p)
    return out


def warm(files: list[Path]) -> None:
    """Read every input file, so the next tool reads them from the page cache."""
    for p in files:
        p.read_bytes()


def nebula(trees: list[Path], work: Path, profile: str | None, compression: str) -> dict:
    store = ChunkStore.open(work / "nebula", Blake3Hasher({}), create=True,
                            compression=compression)
    chunker = Registry().create("chunker", "fastcdc", {})
    prof = None
    if profile:
        try:
            from pyinstrument import Profiler
        except ImportError:
            sys.exit("--profile needs pyinstrument (pip install pyinstrument)")
        prof = Profiler()
        prof.start()
    t0, c0, k0 = time.perf_counter(), time.process_time(), children_cpu()
    for t in trees:
        ingest(store, t, chunker)
    secs = time.perf_counter() - t0
    cpu = time.process_time() - c0 + children_cpu() - k0   # + its worker processes
    if prof:
        prof.stop()
        Path(profile).write_text(prof.output_html())
        print(prof.output_text(unicode=False, color=False, show_all=False)[:6000])
    st = store.stats()
    store.close()
    return {"seconds": secs, "cpu": cpu, "chunked": st["logical_bytes"],
            "unique": st["unique_bytes"],
            "disk": allocated(work / "nebula"), "chunks": st["chunks"]}


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def caidx_chunks(path: Path) -> list[tuple[bytes, int]]:
    """(chunk id, length) from a casync .caidx (48-byte index header, table, 40-byte tail)."""
    data = path.read_bytes()
    items = data[48 + 16:len(data) - 40]
    out, prev = [], 0
    for i in range(0, len(items), 40):
        end, cid = struct.unpack_from("<Q32s", items, i)
        out.append((cid, end - prev))
        prev = end
    return out


def casync(trees: list[Path], work: Path) -> dict:
    store = work / "casync.castr"
    t0, c0 = time.perf_counter(), children_cpu()
    for i, t in enumerate(trees):
        subprocess.run(["casync", "make", f"--store={store}", str(work / f"t{i}.caidx"),
                        str(t)], check=True, capture_output=True)
    secs, cpu = time.perf_counter() - t0, children_cpu() - c0
    chunks = [c for i in range(len(trees)) for c in caidx_chunks(work / f"t{i}.caidx")]
    unique = dict(chunks)
    return {"seconds": secs, "cpu": cpu, "chunked": sum(n for _, n in chunks),
            "unique": sum(unique.values()), "disk": allocated(store), "chunks": len(unique)}


def borg(trees: list[Path], work: Path) -> dict:
    repo = work / "borg"
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               BORG_BASE_DIR=str(work / "borg-home"), BORG_PASSPHRASE="")
    subprocess.run(["borg", "init", "--encryption=none", str(repo)], check=True, env=env,
                   capture_output=True)
    t0, c0 = time.perf_counter(), children_cpu()
    for i, t in enumerate(trees):
        subprocess.run(["borg", "create", f"{repo}::t{i}", "."], check=True, env=env,
                       capture_output=True, cwd=t)
    secs, cpu = time.perf_counter() - t0, children_cpu() - c0
    info = json.loads(subprocess.run(["borg", "info", "--json", str(repo)], check=True,
                                     env=env, capture_output=True, text=True).stdout)
    c = info["cache"]["stats"]
    return {"seconds": secs, "cpu": cpu, "chunked": c["total_size"], "unique": c["unique_size"],
            "disk": allocated(repo), "chunks": c["total_unique_chunks"]}


def ceiling(files: list[Path]) -> dict:
    """FastCDC + BLAKE3 over the same file bytes, already in memory."""
    chunker = Registry().create("chunker", "fastcdc", {})
    blobs = [p.read_bytes() for p in files]
    t0, c0 = time.perf_counter(), time.process_time()
    seen: set[bytes] = set()
    for b in blobs:
        mv = memoryview(b)
        pos = 0
        for n in chunker.cut(mv):
            seen.add(blake3.blake3(mv[pos:pos + n]).digest())
            pos += n
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}


def index_memory(n: int = 1_000_000) -> tuple[float, float]:
    """Bytes per chunk of NEBULA's in-memory index, and of a plain dict, at ``n`` chunks."""
    tracemalloc.start()
    t = ChunkTable()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        t.upsert(blake3.blake3(i.to_bytes(8, "little")).digest(), 1, i * 64 % (1 << 30),
                 60000, 65536, 1, 0)
    ours = (tracemalloc.get_traced_memory()[0] - base) / n
    del t
    tracemalloc.stop()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    d = {}
    for i in range(n):
        d[blake3.blake3(i.to_bytes(8, "little")).digest()] = (1, i * 4096, 60000, 65536, 1, 0)
    plain = (tracemalloc.get_traced_memory()[0] - base) / n
    del d
    tracemalloc.stop()
    return ours, plain


def index_open(work: Path, n: int = 1_000_000) -> tuple[float, float]:
    """CPU seconds to open a store of ``n`` chunks from its log, then from a snapshot."""
    root = work / "open-test"
    ChunkStore.open(root, Blake3Hasher({}), create=True).close()
    with open(root / "index.log", "ab") as fh:
        for start in range(0, n, 100_000):
            fh.write(b"".join(
                log_record(PUT, blake3.blake3(i.to_bytes(8, "little")).digest(), 1,
                           i * 4096 % (1 << 30), 60000, 65536, 1, 0)
                for i in range(start, min(n, start + 100_000))))
    c0 = time.process_time()
    s = ChunkStore.open(root, Blake3Hasher({}))
    from_log = time.process_time() - c0
    assert len(s) == n
    with s.lock():
        s.compact_index()
    s.close()
    c0 = time.process_time()
    s = ChunkStore.open(root, Blake3Hasher({}))
    from_snap = time.process_time() - c0
    assert len(s) == n
    s.close()
    return from_log, from_snap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, help="where stores go (default: a temp dir)")
    ap.add_argument("--profile", metavar="OUT.html", help="pyinstrument profile of NEBULA")
    ap.add_argument("--no-memory", action="store_true", help="skip the 1M-chunk index test")
    ap.add_argument("--runs", type=int, default=3, help="rounds of every tool")
    args = ap.parse_args()
    for tool in ("casync", "borg"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (apt-get install {tool}); cannot compare",
                  file=sys.stderr)
            return 2
    trees = [debian_rootfs(extra_packages=v) for v in VARIANTS]
    files = regular_files(trees)
    total = sum(p.stat().st_size for p in files)
    print(f"input: 3 rootfs trees, {len(files)} regular files, {total / MB:.1f} MB; "
          f"{os.cpu_count()} cores")
    tools = {
        "stellar": lambda w, i: nebula(trees, w, args.profile if i == 0 else None, "lz4"),
        "stellar-zstd": lambda w, i: nebula(trees, w, None, "zstd"),
        "casync": lambda w, i: casync(trees, w),
        "borg": lambda w, i: borg(trees, w),
    }
    rounds: list[dict[str, dict]] = []
    for i in range(args.runs):  # rounds interleave the tools, so load swings hit all alike
        this: dict[str, dict] = {}
        for name, run in tools.items():
            warm(files)
            work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
            load = os.getloadavg()[0]
            try:
                r = run(work, i)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            r["load"] = load
            this[name] = r
            print(f"  round {i + 1} {name:<12} {r['seconds']:6.2f} s wall {r['cpu']:6.2f} s cpu "
                  f"{r['disk'] / MB:7.1f} MB disk  (load {load:.2f})", flush=True)
        rounds.append(this)
    ceil = ceiling(files)
    print("\nper round: wall-time ratios (peer seconds / NEBULA seconds) and stored bytes")
    worst: dict[str, float] = {}
    for i, r in enumerate(rounds):
        parts = []
        for ours in ("stellar", "stellar-zstd"):
            for peer in ("casync", "borg"):
                x = r[peer]["seconds"] / r[ours]["seconds"]
                worst[f"{ours}/{peer}"] = min(worst.get(f"{ours}/{peer}", x), x)
                parts.append(f"{ours} vs {peer} {x:.2f}x")
        print(f"  round {i + 1}: " + ", ".join(parts))
    print(f"\n{'tool':<13} {'wall s':>7} {'MB/s':>7} {'cpu s':>7} {'cpu MB/s':>8} {'dedup':>6} "
          f"{'chunks':>7} {'disk MB':>8} {'in/disk':>7}   (median of {args.runs} rounds)")
    summary = {}
    for name in tools:
        runs = [r[name] for r in rounds]
        med = {k: statistics.median(x[k] for x in runs) for k in ("seconds", "cpu", "disk")}
        r = runs[0]
        summary[name] = {"wall_s": round(med["seconds"], 3), "cpu_s": round(med["cpu"], 3),
                         "ingest_mbs": round(total / MB / med["seconds"], 1),
                         "disk_mb": round(med["disk"] / MB, 2),
                         "dedup_ratio": round(r["chunked"] / r["unique"], 3)}
        print(f"{name:<13} {med['seconds']:7.2f} {total / MB / med['seconds']:7.1f} "
              f"{med['cpu']:7.2f} {total / MB / med['cpu']:8.1f} "
              f"{r['chunked'] / r['unique']:6.3f} {r['chunks']:7d} {med['disk'] / MB:8.1f} "
              f"{total / med['disk']:7.3f}")
    print(f"{'ceiling':<13} {ceil['seconds']:7.2f} {total / MB / ceil['seconds']:7.1f} "
          f"{ceil['cpu']:7.2f} {total / MB / ceil['cpu']:8.1f}"
          "  (FastCDC+BLAKE3 over the same bytes in memory, one core)")
    disk_ok = {ours: all(r[ours]["disk"] <= r["borg"]["disk"] for r in rounds)
               for ours in ("stellar", "stellar-zstd")}
    goals = {f"{ours}: wall >= 3x casync and 2x borg in every round":
             worst[f"{ours}/casync"] >= 3 and worst[f"{ours}/borg"] >= 2
             for ours in ("stellar", "stellar-zstd")}
    goals.update({f"{ours}: disk <= borg in every round": ok for ours, ok in disk_ok.items()})
    for goal, met in goals.items():
        print(f"goal {'met' if met else 'MISSED'}: {goal}")
    if not args.no_memory:
        ours, plain = index_memory()
        print(f"in-memory index at 1M chunks: {ours:.1f} bytes/chunk "
              f"(dict[bytes, tuple] would be {plain:.1f})")
        work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
        try:
            from_log, from_snap = index_open(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"open a 1M-chunk store: {from_log:.2f} s CPU replaying the log, "
              f"{from_snap:.2f} s from a snapshot")
    print(json.dumps({
        "bench": "ingest", "peer": "borg", "systems": summary,
        "higher_is_better": {"wall_s": False, "cpu_s": False, "ingest_mbs": True,
                             "disk_mb": False, "dedup_ratio": True},
        "worst_round_ratio": {k: round(v, 2) for k, v in worst.items()},
        "rounds": [{name: {"wall_s": round(x["seconds"], 3), "cpu_s": round(x["cpu"], 3),
                           "disk_mb": round(x["disk"] / MB, 2), "load": round(x["load"], 2)}
                    for name, x in r.items()} for r in rounds],
        "goals": goals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
