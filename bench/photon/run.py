"""Per-read cost of a volume read through PHOTON vs straight from NEBULA, in one run.

    .venv/bin/python bench/photon/run.py [--reads 20000] [--workdir DIR]

A 64 MiB volume on the 64 KiB grid, half its chunks lz4-compressed (text-like
bytes), half stored raw (random bytes). Each reader is its own process, as a VMM
or the FUSE server is, and does ``--reads`` 4 KiB reads at random offsets
(``Volume.readinto``, the virtio-stellar path), timed with perf_counter:

- ``stellar-nebula`` (the peer: main before #17 item 2): ``VolumeStore`` reading
  NEBULA directly; every read re-hashes (and, if compressed, decompresses) the
  whole 64 KiB chunk it touches.
- ``stellar-photon`` first reader: through the Host's router with an empty
  host-wide hot tier; each chunk is verified and decompressed on its first read
  and placed in /dev/shm.
- ``stellar-photon`` second reader: a new process; the chunks are already hot,
  so each read is a dictionary hit and a copy from shared pages.

Also printed: the bytes hashed and decompressed per process (what "once per host"
saves) and the host's load. The last line is the JSON line of DESIGN.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MiB, CS = 1 << 20, 1 << 16
SIZE = 64 * MiB

READER = """
import json, random, sys, time
from stellarium_core.host import Host
from stellarium_core.volumes.volume import VolumeStore

cfg, mode, reads, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host = Host.from_config(cfg)
vols = VolumeStore.for_host(host) if mode == "photon" else \\
    VolumeStore(host.store_path / "volumes", host.store, host.hasher)
rng = random.Random(11)
offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(reads)]
buf = bytearray(4096)
with vols.open("bench", readonly=True) as vol:
    vol.readinto(0, buf)  # imports, opening the pack and the hot tier: not per read
    t = time.perf_counter()
    for off in offsets:
        vol.readinto(off, buf)
    seconds = time.perf_counter() - t
report = host.photon.report() if mode == "photon" else {}
print(json.dumps({"us_per_read": seconds / reads * 1e6, "report": report}))
"""


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def reader(cfg: Path, mode: str, reads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", READER, str(cfg), mode, str(reads), str(SIZE)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reads", type=int, default=20000)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-photon-", dir=args.workdir))
    try:
        from stellarium_core.host import Host, init_store
        from stellarium_core.photon.shm import default_path
        from stellarium_core.volumes.volume import VolumeStore

        cfg = work / "host.toml"
        cfg.write_text('[store]\npath = "store"\n')
        host = Host.from_config(cfg)
        init_store(host)
        rng = random.Random(5)
        words = [bytes(rng.choice(b"abcdefghij ") for _ in range(rng.randrange(2, 9)))
                 for _ in range(500)]
        with VolumeStore.for_host(host).create("bench", SIZE) as vol:
            for i in range(SIZE // CS):
                if i % 2:
                    data = rng.randbytes(CS)
                else:
                    text = b" ".join(rng.choice(words) for _ in range(CS // 4))
                    data = text[:CS].ljust(CS, b".")
                vol.write(i * CS, data)
        entries = [host.store.entry(r.digest) for r in vol.manifest.refs.values()]
        compressed = sum(e.compressed for e in entries)
        print(f"volume: {SIZE // MiB} MiB, {len(entries)} chunks of 64 KiB, "
              f"{compressed} lz4-compressed; {args.reads} random 4 KiB reads per reader")
        print(f"load before: {load()}")
        direct = reader(cfg, "nebula", args.reads)
        first = reader(cfg, "photon", args.reads)
        second = reader(cfg, "photon", args.reads)
        print(f"load after:  {load()}")
        for name, r in (("stellar-nebula (direct)", direct), ("stellar-photon, 1st process",
                                                            first),
                        ("stellar-photon, 2nd process", second)):
            rep = r["report"]
            hot = rep.get("hot", {})
            print(f"  {name:<30} {r['us_per_read']:8.2f} us/read"
                  + (f"   hot hits {hot.get('hits', 0)}, misses {hot.get('misses', 0)}, "
                     f"warm hits {rep['warm'].get('hits', 0)}" if rep else ""))
        print(f"  chunks hashed+unpacked: direct ~1 per read ({args.reads}); photon "
              f"{first['report']['warm'].get('hits', 0)} in the 1st process, "
              f"{second['report']['warm'].get('hits', 0)} in the 2nd")
        shutil.rmtree(default_path(host.store_path), ignore_errors=True)
        print(json.dumps({
            "bench": "photon", "peer": "stellar-nebula",
            "systems": {
                "stellar-photon": {"read4k_us": round(second["us_per_read"], 2),
                                   "first_process_read4k_us": round(first["us_per_read"], 2)},
                "stellar-nebula": {"read4k_us": round(direct["us_per_read"], 2),
                                   "first_process_read4k_us": round(direct["us_per_read"], 2)},
            },
            "higher_is_better": {"read4k_us": False, "first_process_read4k_us": False},
            "reads": args.reads, "load": load(), "pid": os.getpid(),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
