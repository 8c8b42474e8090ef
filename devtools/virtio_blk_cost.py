"""Python cost of one virtio-blk request through VirtioStellar, on the bare machine.

Drives the device the way a guest driver does (descriptor table, available ring,
kick, used ring) with no VMM and no guest: what is left is the device's own path
(ring, chain walk, request decode, volume read, copy into guest memory, used ring).
The device drains its queue with the C loop (native.py) where the disk allows; the
``--raw`` disk is a plain file (virtio-blk), the default a Stellarium volume.

Usage: python devtools/virtio_blk_cost.py [-n 20000] [--batch 1] [--verify]
       [--data random|text] [--profile]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from stellarium_virtio_stellar.device import T_IN, VirtioStellar
from stellarium_virtio_stellar.file_plugin import open_device

from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
from stellarium_core.virtio import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    MemoryRegion,
    RegionMemory,
    Virtqueue,
)
from stellarium_core.volumes.blockdev import BlockDevice
from stellarium_core.volumes.volume import VolumeStore

QSIZE = 256
DESC, AVAIL, USED, HEAP = 0x1000, 0x3000, 0x4000, 0x100000
DISK = 64 << 20
IO = 4096


class Memory(RegionMemory):
    """Guest RAM over a bytearray (``buf``), one region, as a VMM's memory looks."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        view = memoryview(self.buf)
        host = ctypes.addressof(ctypes.c_char.from_buffer(view))
        super().__init__([(MemoryRegion(0, size, host), view)])


def volume_image(kind: str) -> bytes:
    if kind == "random":
        return os.urandom(DISK)
    line = b"the quick brown fox jumps over the lazy dog %08d\n"
    return b"".join(line % i for i in range(DISK // len(line) + 1))[:DISK]


def setup(work: Path, data: str, verify: bool,
          raw: bool) -> tuple[VirtioStellar, Memory, Virtqueue]:
    hasher = Blake3Hasher({})
    store = ChunkStore.open(work / "nebula", hasher, create=True, verify_reads=verify,
                            compression="lz4")
    (work / "disk.raw").write_bytes(volume_image(data))
    vols = VolumeStore(work / "volumes", store, hasher)
    vols.import_raw("disk", work / "disk.raw").close()
    if raw:
        dev = open_device(str(work / "disk.raw"), readonly=True)
    else:
        vol = vols.open("disk", readonly=True)
        dev = VirtioStellar(BlockDevice(vol), serial="disk", on_close=vol.close)
    mem = Memory(HEAP + QSIZE * 2 * 0x2000)
    q = Virtqueue(QSIZE)
    q.desc_addr, q.avail_addr, q.used_addr, q.ready = DESC, AVAIL, USED, True
    q.check(mem)
    dev.activate(dev.features, mem, [q], lambda: None)
    if hasattr(q, "event_idx"):          # the contract with EVENT_IDX: as Linux negotiates
        q.event_idx = bool(dev.features & (1 << 29))
    for slot in range(QSIZE):            # three descriptors per request: header, data, status
        d, buf = 3 * (slot % (QSIZE // 3)), HEAP + slot * 0x2000
        mem.write(DESC + 16 * d, struct.pack("<QIHH", buf, 16, VIRTQ_DESC_F_NEXT, d + 1))
        mem.write(DESC + 16 * (d + 1), struct.pack("<QIHH", buf + 0x1000, IO,
                                                   VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
                                                   d + 2))
        mem.write(DESC + 16 * (d + 2), struct.pack("<QIHH", buf + 16, 1, VIRTQ_DESC_F_WRITE,
                                                   0))
    return dev, mem, q


def run(dev: VirtioStellar, mem: Memory, q: Virtqueue, n: int, batch: int) -> float:
    """Seconds per request over ``n`` 4 KiB reads at scattered sectors, ``batch`` per kick."""
    sectors = DISK // 512
    heads = QSIZE // 3
    idx = struct.unpack_from("<H", mem.buf, AVAIL + 2)[0]
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        for k in range(batch):
            j = i + k
            d = 3 * (j % heads)
            buf = HEAP + (j % heads) * 0x2000
            struct.pack_into("<IIQ", mem.buf, buf, T_IN, 0, (j * 7919 * 8) % (sectors - 8))
            struct.pack_into("<H", mem.buf, AVAIL + 4 + 2 * (idx % QSIZE), d)
            idx = (idx + 1) & 0xFFFF
        struct.pack_into("<H", mem.buf, AVAIL + 2, idx)
        dev.notify(0)
    elapsed = time.perf_counter() - t0
    if struct.unpack_from("<H", mem.buf, USED + 2)[0] != idx:
        sys.exit("the device did not complete every request")
    return elapsed / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=20000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1, help="requests per kick (1..85)")
    ap.add_argument("--verify", action="store_true", help="store.verify_reads = true")
    ap.add_argument("--data", choices=("random", "text"), default="random",
                    help="text compresses, so its chunks are stored lz4")
    ap.add_argument("--raw", action="store_true", help="a raw file disk (virtio-blk)")
    ap.add_argument("--profile", action="store_true", help="pyinstrument one round")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dev, mem, q = setup(Path(tmp), args.data, args.verify, args.raw)
        run(dev, mem, q, 2000, args.batch)                      # warm the chunk cache
        if args.profile:
            from pyinstrument import Profiler

            with Profiler(interval=0.0001) as prof:
                run(dev, mem, q, args.n, args.batch)
            print(prof.output_text(unicode=True, color=False, show_all=False))
        per = [run(dev, mem, q, args.n, args.batch) for _ in range(args.rounds)]
        dev.close()
    disk = "raw file" if args.raw else f"volume, verify_reads={args.verify}, data={args.data}"
    print(f"4 KiB read, batch {args.batch}, {disk}: "
          f"median {statistics.median(per) * 1e6:.1f} us/request "
          f"(rounds: {', '.join(f'{p * 1e6:.1f}' for p in per)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
