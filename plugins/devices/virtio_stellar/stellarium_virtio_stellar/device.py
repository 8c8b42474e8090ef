"""The virtio-blk device model over a :class:`Disk` (virtio 1.x, section 5.2).

The guest is untrusted: every request is checked (header present, buffers in the
right direction, whole sectors, in range, bounded size) and answered with a status
byte; nothing a guest puts in the queue raises into the VMM. A chain the queue
itself rejects (loops, out-of-memory buffers) stops the queue until the driver
resets the device, since its head can no longer be returned safely.

The queue is drained by the C loop of :mod:`~stellarium_virtio_stellar.native`
(raw files, and volume reads from verified chunk memory); it hands back what only
Python does (volume writes, discard, write-zeroes), which ``_serve`` performs,
the same code that serves every request of disks the loop does not know.

Every request is complete when ``notify`` returns, so a snapshot finds none in flight;
it keeps whether the device gave up on a hostile ring, and the disk's size the guest
read (a restore over a disk of another size is refused).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence

from stellarium_core.errors import StellarError
from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    ChainTooShort,
    DescriptorChain,
    GuestMemory,
    Reader,
    StateError,
    Virtqueue,
    VirtqueueError,
    Writer,
    load_state,
)
from stellarium_core.volumes.blockdev import SECTOR
from stellarium_virtio_stellar import native
from stellarium_virtio_stellar.disks import Disk

log = logging.getLogger(__name__)

DEVICE_ID = 2

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13
VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WRITE_ZEROES_F_UNMAP = 1

HEADER = struct.Struct("<IIQ")           # type, reserved, sector
SEGMENT = struct.Struct("<QII")          # discard / write-zeroes: sector, num_sectors, flags
ID_BYTES = 20

QUEUE_SIZE = 256
SEG_MAX = 128
SIZE_MAX = 256 * 1024
#: The largest data payload one request may carry (what seg_max x size_max allow).
MAX_REQUEST = SEG_MAX * SIZE_MAX
MAX_SEGMENTS = 64                        # discard / write-zeroes ranges per request
MAX_RANGE_SECTORS = 0xFFFFFFFF


class RequestError(Exception):
    """A request the device answers with ``status`` instead of performing it."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class VirtioStellar:
    """A virtio-blk device over a :class:`Disk`; one request queue, served inline on kick."""

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, disk: Disk, *, serial: str = "",
                 on_close: Callable[[], None] | None = None,
                 host_paths: Sequence[tuple[str, bool]] = (),
                 sharing: Callable[[], dict[str, int]] | None = None) -> None:
        self.disk = disk
        self._sharing = sharing
        #: requests, errors, read/write bytes, latency (ns) since the device was made.
        self.stats: Counter[str] = Counter()
        #: The C loop serving the activated queue (its counters join ``stats`` when dropped).
        self._native: native.NativeRing | None = None
        self._host_paths = list(host_paths)
        self.serial = serial.encode()[:ID_BYTES]
        self.readonly = disk.readonly
        self._on_close = on_close
        feats = (VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_SIZE_MAX
                 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH)
        feats |= VIRTIO_BLK_F_RO if self.readonly else (VIRTIO_BLK_F_DISCARD
                                                        | VIRTIO_BLK_F_WRITE_ZEROES)
        self.features = feats
        self._config = self._build_config()
        self.reset()

    def _build_config(self) -> bytes:
        """struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes)."""
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.disk.sectors, SIZE_MAX, SEG_MAX,
            0, 0, 0,                      # geometry (not offered)
            SECTOR,                       # blk_size
            0, 0, 0, 0,                   # topology (not offered)
            0, 0, 1,                      # writeback, unused, num_queues
            MAX_RANGE_SECTORS, MAX_SEGMENTS, 1,        # discard limits, alignment
            MAX_RANGE_SECTORS, MAX_SEGMENTS, 1)        # write-zeroes limits, may_unmap

    # -- the VirtioDevice contract ------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset:offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        """The config space is read-only (writeback toggling is not offered)."""

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        self.driver_features = features
        self.mem, self.queue, self.interrupt = mem, queues[0], interrupt
        self.broken = False
        self._retire_native()
        if self.queue.ready and native.supported(self.disk):
            self._native = native.NativeRing(mem, self.queue, self.disk, serial=self.serial,
                                             max_request=MAX_REQUEST)

    def notify(self, queue: int) -> None:
        if queue != 0 or self.queue is None or self.mem is None or self.broken:
            return
        if self._native is not None:
            wants, broken = self._native.drain(self.mem, self._slow)
            if broken is not None:        # a hostile ring: said once, then nothing served
                log.error("virtio-blk %s: the driver's ring is unusable (%s); requests are "
                          "not served until the driver resets the device",
                          self.serial.decode(errors="replace"), broken)
                self.broken = True
            if wants:
                self.interrupt()
            return
        mem, q, used = self.mem, self.queue, 0
        try:
            for chain in q.drain(mem):
                q.add_used(mem, chain.head, self._serve(chain))
                used += 1
        except (VirtqueueError, ValueError) as exc:
            log.error("virtio-blk %s: the driver's ring is unusable (%s); requests are "
                      "not served until the driver resets the device",
                      self.serial.decode(errors="replace"), exc)
            self.broken = True            # a hostile ring: stop serving until reset
        if used:
            try:
                wants = q.wants_interrupt(mem)
            except ValueError:
                wants = True
            if wants:
                self.interrupt()

    def save_state(self) -> bytes:
        """Flushes the disk first: a snapshot of the VM snapshots its volume next."""
        self.disk.flush()
        return json.dumps({"broken": self.broken, "sectors": self.disk.sectors}).encode()

    def restore_state(self, data: bytes) -> None:
        """Given up or not; the disk must have the size the guest knew."""
        s = load_state(data, "virtio-blk", {"broken": bool, "sectors": int})
        if s["sectors"] != self.disk.sectors:
            raise StateError(f"virtio-blk: the guest knew a disk of {s['sectors']} sectors, "
                             f"this one has {self.disk.sectors}")
        self.broken = s["broken"]

    def metrics(self) -> dict[str, int | float]:
        """Requests, errors, bytes and mean/max latency since start (the VMM's metrics
        lines carry them under this device's id), and how many of the disk's chunks
        other disks of the store share, when the disk is a Stellarium one."""
        s = self._totals()
        n = s["requests"]
        out: dict[str, int | float] = {
            "requests": n, "errors": s["errors"], "read_bytes": s["read_bytes"],
            "write_bytes": s["write_bytes"],
            "latency_us_avg": round(s["latency_ns"] / n / 1000, 1) if n else 0.0,
            "latency_us_max": round(s["latency_ns_max"] / 1000, 1)}
        if self._sharing is not None:
            out.update(self._sharing())
        return out

    def host_paths(self) -> list[tuple[str, bool]]:
        """Where the disk reads (and writes) once the VMM is confined: its store."""
        return list(self._host_paths)

    def _totals(self) -> Counter[str]:
        """Python's counters plus the C loop's (requests either one completed)."""
        s = Counter(self.stats)
        if self._native is not None:
            c = self._native.stats()
            s["latency_ns_max"] = max(s["latency_ns_max"], c.pop("latency_ns_max"))
            s.update(c)
        return s

    def _retire_native(self) -> None:
        """Drop the C loop's ring, keeping what it counted."""
        if self._native is not None:
            self.stats = self._totals()
            self._native = None

    def reset(self) -> None:
        self._retire_native()
        self.mem: GuestMemory | None = None
        self.queue: Virtqueue | None = None
        self.interrupt: Callable[[], None] = _no_interrupt
        self.driver_features = 0
        self.broken = False

    def close(self) -> None:
        """Flush and release the volume (the VMM is done with the device)."""
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    # -- requests -----------------------------------------------------------------

    def _slow(self, chain: DescriptorChain) -> int:
        """A request the C loop handed back: a volume read of slots it has no chunk memory
        for (published, then served by C) or one only Python performs."""
        ring, mem = self._native, self.mem
        assert ring is not None and mem is not None
        rtype, sector, nbytes = _peek(chain, mem)
        if rtype == T_IN and ring.publish(sector, nbytes):
            written = ring.serve_again(chain.head)
            if written is not None:
                return written
        written = self._serve(chain)
        if rtype == T_OUT:
            ring.unpublish(sector, nbytes)
        elif rtype in (T_DISCARD, T_WRITE_ZEROES):
            ring.unpublish()
        return written

    def _serve(self, chain: DescriptorChain) -> int:
        """Perform one request; returns the bytes written into the chain (incl. status)."""
        mem = self.mem
        assert mem is not None
        started = time.perf_counter_ns()
        data_out = chain.writer(mem)
        try:
            status_out = data_out.split_tail(1)
        except ChainTooShort:
            return 0                      # nowhere to put a status: drop it
        written = 0
        try:
            written = self._request(chain.reader(mem), data_out)
            status = S_OK
        except RequestError as exc:
            status = exc.status
        except (StellarError, ValueError, OSError, MemoryError):
            status = S_IOERR
        status_out.write(bytes((status,)))
        took = time.perf_counter_ns() - started
        st = self.stats
        st["requests"] += 1
        st["errors"] += status != S_OK
        st["latency_ns"] += took
        if took > st["latency_ns_max"]:
            st["latency_ns_max"] = took
        return written + 1

    def _request(self, readable: Reader, data_out: Writer) -> int:
        r_len = readable.remaining
        w_len = data_out.remaining
        if r_len < HEADER.size:
            raise RequestError(S_IOERR)
        rtype, _, sector = readable.unpack(HEADER)
        payload = r_len - HEADER.size
        if rtype == T_IN:
            if payload or w_len % SECTOR or w_len > MAX_REQUEST:
                raise RequestError(S_IOERR)
            self._check_range(sector, w_len // SECTOR)
            data_out.write_from(self.disk.read_views(sector, w_len // SECTOR))
            self.stats["read_bytes"] += w_len
            return w_len
        if rtype == T_OUT:
            if w_len or payload % SECTOR or payload > MAX_REQUEST:
                raise RequestError(S_IOERR)
            if self.readonly:
                raise RequestError(S_IOERR)
            self._check_range(sector, payload // SECTOR)
            self.disk.write(sector, readable.take(payload))
            self.stats["write_bytes"] += payload
            return 0
        if rtype == T_FLUSH:
            if not self.readonly:
                self.disk.flush()
            return 0
        if rtype == T_GET_ID:
            ident = self.serial[:w_len]
            data_out.write(ident.ljust(min(w_len, ID_BYTES), b"\0"))
            return min(w_len, ID_BYTES)
        if rtype in (T_DISCARD, T_WRITE_ZEROES) and not self.readonly:
            self._ranges(readable, rtype, payload, w_len)
            return 0
        raise RequestError(S_UNSUPP)

    def _ranges(self, readable: Reader, rtype: int, payload: int, w_len: int) -> None:
        """Discard or write-zeroes: all segments are checked before any is applied."""
        if w_len or not payload or payload % SEGMENT.size \
                or payload // SEGMENT.size > MAX_SEGMENTS:
            raise RequestError(S_IOERR)
        raw = readable.take(payload)
        segs = [SEGMENT.unpack_from(raw, i) for i in range(0, payload, SEGMENT.size)]
        for sector, count, flags in segs:
            if flags & ~(WRITE_ZEROES_F_UNMAP if rtype == T_WRITE_ZEROES else 0):
                raise RequestError(S_UNSUPP)
            self._check_range(sector, count)
        for sector, count, _ in segs:
            if rtype == T_DISCARD:
                self.disk.discard(sector, count)
            else:
                self.disk.write_zeroes(sector, count)

    def _check_range(self, sector: int, count: int) -> None:
        if sector + count > self.disk.sectors:
            raise RequestError(S_IOERR)


def _peek(chain: DescriptorChain, mem: GuestMemory) -> tuple[int, int, int]:
    """(type, sector, data bytes) of a request, -1 for a chain without a header."""
    reader = chain.reader(mem)
    if reader.remaining < HEADER.size:
        return -1, 0, 0
    rtype, _, sector = reader.unpack(HEADER)
    if rtype == T_IN:
        return rtype, sector, max(chain.writer(mem).remaining - 1, 0)
    return rtype, sector, reader.remaining


def _no_interrupt() -> None:
    """Before activation there is nobody to interrupt."""

