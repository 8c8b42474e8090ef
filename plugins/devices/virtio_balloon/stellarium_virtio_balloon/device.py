"""The virtio memory balloon (virtio 1.x, section 5.5): the host asks the guest to give
pages back, and they really go back.

The guest reports inflated pages as 4 KiB page frame numbers; the device releases the
host pages behind them at once. Guest RAM that is a memfd (Volt's default) is released
with MADV_REMOVE, which punches the range out of the memfd: measured here, MADV_DONTNEED
on a MAP_SHARED memfd mapping only unmaps the pages and the memfd keeps them (RSS falls
but no memory is freed), while MADV_REMOVE frees them. Private guest RAM (KSM mode) is
released with MADV_DONTNEED. A deflated page needs nothing: the guest's next touch
faults a fresh zero page in.

Statistics follow the spec's protocol: the driver leaves one buffer of (tag, value)
pairs in the stats queue; the device keeps it and, every polling interval, hands it
back so the driver refills it. Target and statistics are what Firecracker's balloon
API reads and writes (``set_target_mib``, ``set_stats_interval``, ``statistics``).

Across a snapshot the device keeps its target, the driver's ``actual``, the polling
interval and the stats buffer it holds (popped from the stats queue, not yet returned).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import select
import struct
from collections.abc import Callable

from stellarium_core.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    DeviceLink,
    GuestMemory,
    QueueDevice,
    StateError,
    Timer,
    Virtqueue,
    VirtqueueError,
    load_state,
)

DEVICE_ID = 5
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2
INFLATE, DEFLATE, STATS = 0, 1, 2
QUEUE_SIZE = 256
PAGE_SHIFT = 12                   # the balloon's page frames are always 4 KiB
PAGE = 1 << PAGE_SHIFT
PAGES_PER_MIB = (1 << 20) >> PAGE_SHIFT
MADV_DONTNEED, MADV_REMOVE = 4, 9
#: The largest target (the config's u32 page count, in MiB).
MAX_MIB = 0xFFFFFFFF // PAGES_PER_MIB
#: The most page frames one request may carry (Linux sends at most 256).
MAX_PFNS = 4096

_CONFIG = struct.Struct("<II")    # num_pages (device: the target), actual (driver)
_STAT = struct.Struct("<HQ")
#: Stat tags (spec 5.5.6.3) by Firecracker's names for them.
STAT_NAMES = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults",
              4: "free_memory", 5: "total_memory", 6: "available_memory", 7: "disk_caches",
              8: "hugetlb_allocations", 9: "hugetlb_failures"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class VirtioBalloon(QueueDevice):
    """A balloon whose target starts at ``amount_mib``."""

    device_id = DEVICE_ID
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, amount_mib: int = 0, *, deflate_on_oom: bool = False,
                 stats_polling_interval_s: int = 0) -> None:
        super().__init__()
        self.features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_BALLOON_F_STATS_VQ
        if deflate_on_oom:
            self.features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        self.target_pages = self._pages(amount_mib)
        self.actual_pages = 0
        self.stats_interval = stats_polling_interval_s
        self.stats: dict[str, int] = {}
        self._stats_head: int | None = None
        self._timer = Timer()
        self.counters = {"inflated_pages": 0, "deflated_pages": 0, "released_bytes": 0,
                         "release_errors": 0, "bad_pfns": 0, "stats_updates": 0}

    @staticmethod
    def _pages(mib: int) -> int:
        if not 0 <= mib <= MAX_MIB:
            raise ValueError(f"amount_mib must be between 0 and {MAX_MIB}, got {mib}")
        return mib * PAGES_PER_MIB

    # -- the VirtioDevice contract ----------------------------------------------------

    def attach(self, link: DeviceLink) -> None:
        super().attach(link)
        link.loop.add(self._timer.fd, self._poll_stats, select.EPOLLIN)

    def config(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver reports how many pages it holds (``actual``, bytes 4..7)."""
        if offset == 4 and len(data) == 4:
            self.actual_pages = int.from_bytes(data, "little")

    def activate(self, features: int, mem: GuestMemory, queues: list[Virtqueue],
                 interrupt: Callable[[], None]) -> None:
        with self.lock:
            super().activate(features, mem, queues, interrupt)
            self._stats_head = None
            if self.stats_interval and features & VIRTIO_BALLOON_F_STATS_VQ:
                self._timer.arm(self.stats_interval, self.stats_interval)

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self._stats_head = None
            self.actual_pages = 0

    def notify(self, queue: int) -> None:
        with self.lock:
            if not self.active or queue >= len(self.queues):
                return
            try:
                if queue == STATS:
                    self._take_stats()
                else:
                    self._pages_from(queue)
            except VirtqueueError as exc:
                self.give_up(str(exc))

    # -- inflate / deflate --------------------------------------------------------------

    def _pages_from(self, queue: int) -> None:
        mem, q = self.mem, self.queues[queue]
        assert mem is not None
        used = 0
        for chain in q.drain(mem):
            r = chain.reader(mem)
            n = min(r.remaining // 4, MAX_PFNS)
            pfns = struct.unpack(f"<{n}I", r.read(4 * n)) if n else ()
            if queue == INFLATE:
                self._release(mem, pfns)
                self.counters["inflated_pages"] += len(pfns)
            else:
                self.counters["deflated_pages"] += len(pfns)
            q.add_used(mem, chain.head, 0)
            used += 1
        if used:
            self.used(q)

    def _release(self, mem: GuestMemory, pfns: tuple[int, ...]) -> None:
        """Give the host pages behind ``pfns`` back, one madvise per run of adjacent frames."""
        for start, count in _runs(sorted(set(pfns))):
            addr, size = start << PAGE_SHIFT, count << PAGE_SHIFT
            region = next((g for g in mem.regions
                           if g.guest_addr <= addr and addr + size <= g.end), None)
            if region is None:
                self.counters["bad_pfns"] += count
                continue
            host = region.host_addr + addr - region.guest_addr
            advice = MADV_REMOVE if region.shareable else MADV_DONTNEED
            if host % mmap.PAGESIZE or _libc.madvise(host, size, advice) != 0:
                self.counters["release_errors"] += count
            else:
                self.counters["released_bytes"] += size

    # -- statistics -----------------------------------------------------------------------

    def _take_stats(self) -> None:
        mem, q = self.mem, self.queues[STATS]
        assert mem is not None
        for chain in q.drain(mem):
            if self._stats_head is not None:       # a second buffer: return the older one
                q.add_used(mem, self._stats_head, 0)
                self.used(q)
            r = chain.reader(mem)
            stats = {}
            for _ in range(min(r.remaining // _STAT.size, 64)):
                tag, value = r.unpack(_STAT)
                if tag in STAT_NAMES:
                    stats[STAT_NAMES[tag]] = value
            self.stats = stats
            self.counters["stats_updates"] += 1
            self._stats_head = chain.head

    def _poll_stats(self, _events: int) -> None:
        """Polling interval elapsed: hand the stats buffer back so the driver refills it."""
        self._timer.ack()
        with self.lock:
            if not self.active or self._stats_head is None or len(self.queues) <= STATS:
                return
            head, self._stats_head = self._stats_head, None
            q = self.queues[STATS]
            try:
                q.add_used(self.mem, head, 0)
            except VirtqueueError as exc:
                self.give_up(str(exc))
                return
            self.used(q)

    # -- snapshots ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        with self.lock:
            return json.dumps({"target_pages": self.target_pages,
                               "actual_pages": self.actual_pages,
                               "stats_interval": self.stats_interval,
                               "stats_head": self._stats_head}).encode()

    def restore_state(self, data: bytes) -> None:
        """After activation: the saved sizes, interval and held stats buffer (a head that
        must be a descriptor of an activated stats queue)."""
        u32 = (0, 0xFFFFFFFF)
        s = load_state(data, "virtio-balloon", {
            "target_pages": (0, MAX_MIB * PAGES_PER_MIB), "actual_pages": u32,
            "stats_interval": u32, "stats_head": (int, type(None))})
        head = s["stats_head"]
        with self.lock:
            if head is not None and not (self.active and len(self.queues) > STATS
                                         and 0 <= head < self.queues[STATS].size):
                raise StateError(f"virtio-balloon: held stats buffer {head} is not a "
                                 "descriptor of an activated stats queue")
            self.target_pages, self.actual_pages = s["target_pages"], s["actual_pages"]
            self._stats_head = head
            self.set_stats_interval(s["stats_interval"])

    # -- runtime control (Firecracker's balloon API) ---------------------------------------

    def set_target_mib(self, amount_mib: int) -> None:
        """Ask the guest to hold ``amount_mib`` MiB in the balloon (config interrupt)."""
        self.target_pages = self._pages(amount_mib)
        if self.link is not None:
            self.link.config_changed()

    def set_stats_interval(self, seconds: int) -> None:
        """Refresh statistics every ``seconds`` (0 stops)."""
        if seconds < 0:
            raise ValueError(f"stats_polling_interval_s must be >= 0, got {seconds}")
        self.stats_interval = seconds
        if seconds and self.active:
            self._timer.arm(seconds, seconds)
        elif not seconds:
            self._timer.disarm()

    def statistics(self) -> dict[str, int]:
        """Firecracker's GET /balloon/statistics: target and actual size, guest stats."""
        with self.lock:
            out = dict(self.stats)
        return {"target_pages": self.target_pages, "actual_pages": self.actual_pages,
                "target_mib": self.target_pages // PAGES_PER_MIB,
                "actual_mib": self.actual_pages // PAGES_PER_MIB, **out}

    def close(self) -> None:
        self.unwatch(self._timer.fd)
        self._timer.close()


def _runs(pfns: list[int]) -> list[tuple[int, int]]:
    """Sorted page frames as (first, count) runs of adjacent frames."""
    runs: list[tuple[int, int]] = []
    for p in pfns:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs
