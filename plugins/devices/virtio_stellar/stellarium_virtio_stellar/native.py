"""The request queue served by ``blkring.c``: what Python hands the C loop, and back.

:class:`NativeRing` is built at activation over guest memory, the validated queue
and the disk: a raw file is read and written by the C loop itself (preadv/pwritev
into guest RAM); a Stellarium volume is read from chunk memory Python has verified
and *published* into the slot table (one pointer per 64 KiB slot, kept alive
here), so each chunk is hashed once when it enters this process, never per read.
Everything else (volume writes and flushes, discard, write-zeroes, a read of an
unpublished or unflushed slot) comes back as a slow request that the device serves
in Python, exactly as it did before this loop existed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stellarium_core.virtio import DescriptorChain, GuestMemory, Virtqueue
from stellarium_core.volumes.blockdev import SECTOR, BlockDevice
from stellarium_core.volumes.volume import Volume
from stellarium_virtio_stellar._blkring import ffi, lib
from stellarium_virtio_stellar.disks import Disk, RawFileDisk

MAX_REGIONS = 8


def supported(disk: Disk) -> bool:
    """Disks the C loop can serve: a raw file, or a volume's block view."""
    return isinstance(disk, RawFileDisk) or (
        isinstance(disk, BlockDevice) and isinstance(disk.volume, Volume))


class NativeRing:
    """One activated virtio-blk queue, drained by the C loop."""

    def __init__(self, mem: GuestMemory, queue: Virtqueue, disk: Disk, *, serial: bytes,
                 max_request: int) -> None:
        regions = list(mem.regions)
        if not 1 <= len(regions) <= MAX_REGIONS:
            raise ValueError(f"{len(regions)} guest memory regions (the C loop takes "
                             f"1..{MAX_REGIONS})")
        d = ffi.new("struct vb_dev *")
        self._keep: list[Any] = []
        for i, r in enumerate(regions):
            host = ffi.from_buffer("uint8_t[]", mem.view(r.guest_addr, r.size),
                                   require_writable=True)
            self._keep.append(host)
            d.regions[i].gpa, d.regions[i].size, d.regions[i].host = r.guest_addr, r.size, host
        d.nregions = len(regions)
        d.qsize = queue.size
        d.desc_gpa, d.avail_gpa, d.used_gpa = queue.desc_addr, queue.avail_addr, queue.used_addr
        d.event_idx = int(queue.event_idx)
        d.sectors = disk.sectors
        d.readonly = int(disk.readonly)
        d.max_request = max_request
        d.serial_len = len(serial)
        ffi.memmove(d.serial, serial, len(serial))
        self._seen = ffi.new("uint32_t[]", queue.size)
        self._seg = ffi.new("struct seg[]", queue.size)       # freed with this object
        d.seen, d.seg = self._seen, self._seg
        self.volume: Volume | None = None
        if isinstance(disk, RawFileDisk):
            d.fd = disk.fd
        else:
            assert isinstance(disk, BlockDevice) and isinstance(disk.volume, Volume)
            self.volume = disk.volume
            d.fd = -1
            d.shift = self.volume.manifest.shift
            d.nslots = self.volume.manifest.slots
            self._slots = ffi.new("const uint8_t *[]", d.nslots)
            d.slots = self._slots
            self._published: dict[int, Any] = {}
        self.d = d
        self.queue = queue
        self.load(queue)

    # -- ring state shared with the Python Virtqueue --------------------------------

    def load(self, q: Virtqueue) -> None:
        self.d.last_avail, self.d.used_idx = q.last_avail, q.used_idx
        self.d.signalled_used = q.signalled_used

    def store(self, q: Virtqueue) -> None:
        q.last_avail, q.used_idx = self.d.last_avail, self.d.used_idx
        q.signalled_used = self.d.signalled_used

    # -- serving ---------------------------------------------------------------------

    def drain(self, mem: GuestMemory,
              slow: Callable[[DescriptorChain], int]) -> tuple[bool, str | None]:
        """Serve until the ring is empty; ``slow`` serves a chain the C loop hands back
        and returns the bytes it wrote. Returns (the driver wants an interrupt, why the
        ring is unusable or None); what was served before a hostile chain stays served."""
        d, q = self.d, self.queue
        self.load(q)
        broken = None
        try:
            while True:
                r = lib.vb_drain(d)
                if r == lib.VB_EMPTY:
                    break
                if r == lib.VB_BROKEN:
                    broken = ffi.string(d.error).decode()
                    break
                head = d.slow_head
                lib.vb_complete(d, head, slow(q._walk(mem, head)))
            wants = bool(d.used_since_signal) and bool(lib.vb_wants_interrupt(d))
        finally:
            self.store(q)
        return wants, broken

    def stats(self) -> dict[str, int]:
        """The device's metrics counters for the requests C completed."""
        d = self.d
        return {"requests": d.requests, "errors": d.errors, "read_bytes": d.read_bytes,
                "write_bytes": d.write_bytes, "latency_ns": d.latency_ns,
                "latency_ns_max": d.latency_ns_max}

    def serve_again(self, head: int) -> int | None:
        """The chain at ``head`` served by C after :meth:`publish` (bytes written), or
        None when it still needs Python."""
        written = lib.vb_serve_one(self.d, head)
        return None if written < 0 else written

    # -- the slot table (volumes) ---------------------------------------------------------

    def _slots_of(self, sector: int, nbytes: int) -> range:
        assert self.volume is not None
        m = self.volume.manifest
        start = sector * SECTOR
        end = min(start + max(nbytes, 1) - 1, m.size - 1)
        return range(start >> m.shift, (end >> m.shift) + 1)

    def publish(self, sector: int, nbytes: int) -> bool:
        """Publish the slots a read touches (each chunk verified as it is read, once);
        False when one has unflushed writes (Python reads those) or this is no volume."""
        if self.volume is None:
            return False
        for idx in self._slots_of(sector, nbytes):
            if idx in self._published:
                continue
            view = self.volume.stable_slot(idx)
            if view is None:
                return False
            ptr = ffi.from_buffer("uint8_t[]", view)
            self._published[idx] = (view, ptr)
            self._slots[idx] = ptr
        return True

    def unpublish(self, sector: int | None = None, nbytes: int = 0) -> None:
        """Forget the slots a write touched (every slot when ``sector`` is None)."""
        if self.volume is None:
            return
        idxs = list(self._published) if sector is None else [
            i for i in self._slots_of(sector, nbytes) if i in self._published]
        for i in idxs:
            self._slots[i] = ffi.NULL
            del self._published[i]
