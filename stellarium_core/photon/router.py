"""PHOTON: one chunk interface over hot (memory), warm (local disk) and cold (S3) tiers.

Reads look in hot, then warm, then cold, and check the digest of whatever a
tier below hot returns; a corrupt copy is skipped (and repaired from the good
one found lower). Accesses feed a :class:`~stellarium_core.photon.policy.Policy`
that decides promotion. Writes land durably in warm and reach cold through an
asynchronous :class:`~stellarium_core.photon.writeback.WriteBack`, or go to cold
synchronously when there is no warm tier. Hot and warm are trimmed to their
capacities, and hot also while the host's MemAvailable is below a watermark.

The one invariant: a chunk leaves a tier only once a lower tier holds it
durably (``put`` returned there, or the object store says it has it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stellarium_core.config import TIER_LEVELS
from stellarium_core.errors import StellarError
from stellarium_core.holders import RECORDS
from stellarium_core.hookspecs import Hasher, TierBackend, TierFull, TierUnavailable, TierUsage
from stellarium_core.nebula import CorruptChunkError, MissingChunkError
from stellarium_core.photon.nebula_tier import NebulaTier, nebula_exists
from stellarium_core.photon.policy import Policy
from stellarium_core.photon.stats import STATS_FILE, Stats
from stellarium_core.photon.views import ViewCache
from stellarium_core.photon.writeback import WriteBack

LEVELS = TIER_LEVELS  # fastest first; the config accepts exactly these
JOURNAL_FILE = "writeback.journal"
MEMINFO = Path("/proc/meminfo")
SAVE_EVERY = 4096  # lookups between saves of the counters ...
SAVE_SECONDS = 1.0  # ... or seconds, whichever comes first (servers that get killed)
IN_COLD_CACHE = 1 << 18  # digests remembered as durable in cold
LOCAL_VIEWS = 128  # verified views a process keeps when it cannot place them hot
REMOTE = ("peers", "cold")  # read levels beyond this host: a hit there is copied to warm


class ChunkNotFound(MissingChunkError):
    """No tier holds the chunk."""


class ChunkCorrupt(CorruptChunkError):
    """Every copy found failed its hash check."""


class RemoteWriteError(StellarError):
    """A write under remote durability that the object store did not take."""


def meminfo(path: Path = MEMINFO) -> dict[str, int]:
    """The fields of a /proc/meminfo-format file, in bytes."""
    out = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


@dataclass
class _Trouble:
    """What one lookup met on its way down: corrupt copies (levels, and why), and
    levels it could not reach."""

    corrupt: list[str] = field(default_factory=list)
    why: list[str] = field(default_factory=list)
    unavailable: list[str] = field(default_factory=list)

    def bad(self, level: str, why: str) -> None:
        self.corrupt.append(level)
        self.why.append(why)


class PhotonRouter:
    """Places, finds, promotes and evicts chunks across the configured tier levels.

    ``tiers`` maps levels (``hot``, ``warm``, ``cold``; any subset) to backends,
    which the router then owns and closes. ``capacities`` caps hot and warm in
    bytes (None: the backend's own capacity, else unbounded). ``min_available``
    is the MemAvailable watermark (None: 5% of MemTotal, 0: off), checked every
    ``pressure_every`` hot placements. ``state_dir`` holds the stats file and
    the write-back journal (None: nothing persisted). Write-back to cold runs
    in ``writeback_workers`` threads behind a queue of ``queue_size`` digests.
    """

    def __init__(self, tiers: Mapping[str, TierBackend], hasher: Hasher,
                 policy: Policy | None = None, *,
                 capacities: Mapping[str, int | None] | None = None,
                 state_dir: Path | None = None, min_available: int | None = None,
                 meminfo_path: Path = MEMINFO, pressure_every: int = 16,
                 admit_writes: bool = False, queue_size: int = 1024,
                 base_delay: float = 0.05, max_delay: float = 5.0,
                 cold_attempts: int = 5, writeback_workers: int = 4,
                 writeback: bool = True, peers: TierBackend | None = None) -> None:
        unknown = set(tiers) - set(LEVELS)
        if unknown or not tiers:
            raise ValueError(f"tier levels must be a non-empty subset of {LEVELS}, "
                             f"got {sorted(tiers)}")
        self.levels = [lvl for lvl in LEVELS if lvl in tiers]
        self.tiers = dict(tiers)
        self.hasher = hasher
        self.policy = policy or Policy()
        caps = dict(capacities or {})
        if "hot" in tiers:  # the tighter of the configured and the backend's own cap
            own = getattr(tiers["hot"], "capacity", None)  # without opening the tier:
            if own is None:  # a VMM builds its router before it is confined
                try:
                    own = tiers["hot"].usage().capacity_bytes
                except TierUnavailable:  # reads then skip it; placing stops at the first try
                    own = None
            limits = [c for c in (caps.get("hot"), own) if c is not None]
            caps["hot"] = min(limits) if limits else None
        self.capacities = {lvl: caps.get(lvl) for lvl in self.levels if lvl != "cold"}
        self.admit_writes = admit_writes
        self._meminfo_path = meminfo_path
        if min_available is None and "hot" in tiers:
            try:
                min_available = meminfo(meminfo_path).get("MemTotal", 0) // 20
            except OSError:
                min_available = 0
        self.min_available = min_available or 0
        self._pressure_every = max(1, pressure_every)
        self._placements = 0
        self._lookups = 0
        self._save_at = time.monotonic() + SAVE_SECONDS
        self._base_delay, self._max_delay = base_delay, max_delay
        self._cold_attempts = cold_attempts
        self._in_cold: set[bytes] = set()
        self._durable_gen = 0  # bumps when more chunks may be evictable
        self._stuck: dict[str, int] = {}  # level -> _durable_gen when trimming last failed
        self._cold_retry_at = 0.0  # no cold probes before this (monotonic) time
        self._lock = threading.RLock()
        self._hot_closed = False  # placing hot failed for good in this process
        self._promoting = threading.local()  # this thread copies a remote chunk into warm
        self._local = ViewCache(max_items=LOCAL_VIEWS)
        #: When a dict, every chunk read through :meth:`view` is added in first-access
        #: order (a boot's trace, from which its prefetch set is recorded).
        self.trace: dict[bytes, None] | None = None
        self.state_dir = state_dir
        self.stats = Stats(state_dir / STATS_FILE if state_dir else None)
        self._read_levels = [*self.levels]
        if peers is not None:
            peers.stats = self.stats  # it counts the copies it rejected
            self.tiers["peers"] = peers
            at = self._read_levels.index("cold") if "cold" in tiers else len(self._read_levels)
            self._read_levels.insert(at, "peers")
        self.writeback: WriteBack | None = None
        if "cold" in tiers and "warm" in tiers and writeback:
            self.writeback = WriteBack(
                tiers["cold"], self._local_copy, on_done=self._cold_done,
                journal=state_dir / JOURNAL_FILE if state_dir else None,
                queue_size=queue_size, base_delay=base_delay, max_delay=max_delay,
                workers=writeback_workers)

    # -- writing ------------------------------------------------------------------

    def put(self, data: bytes | memoryview, *, pin: bool = False) -> bytes:
        """Store ``data`` durably in the lowest-latency durable tier; return its digest.

        With a warm tier the chunk is on local disk when this returns and on
        its way to cold; without one it is in cold when this returns.
        """
        key = self.hasher.digest(data)
        if "warm" in self.tiers:
            warm = self.tiers["warm"]
            if not warm.contains(key):
                warm.put(key, data)
                if self.writeback is not None and key not in self._in_cold:
                    self.writeback.submit(key)
            self._trim("warm")
        elif "cold" in self.tiers:
            self._cold_put(key, data)
        if pin:
            self._pin(key, data)
        elif "hot" in self.tiers and (self.admit_writes or len(self.levels) == 1):
            self._place_hot(key, data, required=len(self.levels) == 1)
        return key

    def _cold_put(self, key: bytes, data: bytes | memoryview) -> None:
        """Synchronous put to cold with backoff, for hosts without a warm tier."""
        for attempt in range(self._cold_attempts):
            try:
                self.tiers["cold"].put(key, data)
                self._mark_cold(key)
                return
            except TierUnavailable:
                self.stats.add("cold", "errors")
                if attempt + 1 == self._cold_attempts:
                    raise
                time.sleep(min(self._max_delay, self._base_delay * 2 ** attempt))

    def persist(self, key: bytes, *, new: bool = True) -> None:
        """Make the local chunk ``key`` durable in cold before returning (``durability =
        "remote"``): a stored chunk is uploaded, a re-referenced one only if cold lacks
        it; copies the router itself brings in from peers or cold are caches, not writes,
        and are not uploaded. Raises :class:`RemoteWriteError` when the object store
        cannot take it."""
        if key in self._in_cold or getattr(self._promoting, "active", False):
            return
        try:
            if not new and self.tiers["cold"].contains(key):
                self._mark_cold(key)
                return
            data = self._local_copy(key)
            if data is None:
                raise StellarError(f"chunk {key.hex()} has no good local copy to upload")
            self._cold_put(key, data)
        except StellarError as exc:
            raise RemoteWriteError(
                f"not acknowledged: chunk {key.hex()} could not be stored in the cold tier, "
                f"and durability is \"remote\" ({exc}); the data is kept in this node's "
                "store, so the same write succeeds once the object store is back") from None

    # -- reading ------------------------------------------------------------------

    def get(self, key: bytes) -> bytes:
        """The chunk ``key``, from the fastest tier holding a good copy."""
        data = self.view(key)
        return data.obj if isinstance(data.obj, bytes) and len(data.obj) == len(data) \
            else bytes(data)

    def view(self, key: bytes, *, local: bool = False) -> memoryview:
        """The chunk ``key`` as a memoryview, verified; zero-copy when it is hot.
        ``local`` looks only on this host (no peers, no cold): what a node serves.

        A hot hit is a read that needs no hashing and no decompressing: the chunk
        is in the host-wide hot tier, or among the views this process verified and
        could not place there (a hot tier that is full or read-only to it).
        """
        if self.trace is not None:
            self.trace.setdefault(key)
        mv = self._local.get(key) if self._local else None
        if mv is not None:
            self._hit("hot", key)
            return mv
        hot = self.tiers.get("hot")
        if hot is not None:
            try:
                found = self._hot_view(key)
            except TierUnavailable:
                self.stats.add("hot", "errors")
                found = None
            if found is not None:
                self._hit("hot", key)
                return memoryview(found)
            self.stats.add("hot", "misses")
        return self._below_hot(key, local)

    def _hit(self, level: str, key: bytes) -> None:
        self.stats.add(level, "hits")
        self._lookups += 1
        if self._lookups % SAVE_EVERY == 0 or time.monotonic() > self._save_at:
            self._save_at = time.monotonic() + SAVE_SECONDS
            self.stats.save()  # so `stellar tiers` sees a long-running router
        if level == "hot":
            self.policy.touch(key)

    def _hot_view(self, key: bytes) -> memoryview | bytes | None:
        hot = self.tiers["hot"]
        view = getattr(hot, "view", None)
        return view(key) if view is not None else hot.get(key)

    def _below_hot(self, key: bytes, local: bool = False) -> memoryview:
        trouble = _Trouble()
        levels = [lvl for lvl in self._read_levels
                  if lvl != "hot" and not (local and lvl in REMOTE)]
        found = self._good_copy(key, levels, trouble)
        if found is not None:
            level, data = found
            return self._after_hit(key, memoryview(data), level, trouble.corrupt)
        if trouble.corrupt:
            raise ChunkCorrupt(f"chunk {key.hex()}: no tier has a good copy "
                               f"({'; '.join(trouble.why)})")
        if trouble.unavailable:
            raise TierUnavailable(f"chunk {key.hex()} not found; unreachable: "
                                  + "; ".join(trouble.unavailable))
        raise ChunkNotFound(f"chunk {key.hex()} is not in the store (no tier holds it: "
                            f"{', '.join(self._read_levels)})")

    def _good_copy(self, key: bytes, levels: list[str],
                   trouble: _Trouble) -> tuple[str, bytes | memoryview] | None:
        """The first level of ``levels`` with a copy that checks out, and that copy;
        counts every miss, error and corrupt copy on the way (also in ``trouble``)."""
        for level in levels:
            tier = self.tiers[level]
            try:
                data = tier.view(key) if hasattr(tier, "view") else tier.get(key)
            except TierUnavailable as exc:
                self.stats.add(level, "errors")
                trouble.unavailable.append(str(exc))
                continue
            except CorruptChunkError as exc:  # NEBULA checked the bytes itself
                trouble.bad(level, f"{level}: {exc}")
                self.stats.add(level, "corrupt")
                continue
            if data is None:
                self.stats.add(level, "misses")
                continue
            if not getattr(tier, "verified", False) and self.hasher.digest(data) != key:
                trouble.bad(level, f"the copy in {level} fails its {self.hasher.name} check")
                self.stats.add(level, "corrupt")
                continue
            self._hit(level, key)
            return level, data
        return None

    def fetch(self, key: bytes) -> bytes | None:
        """``key`` from beyond this host (peers in ring order, then cold), verified, and
        not kept: for a caller that stores it itself (a pull). None if none has it."""
        found = self._good_copy(key, [lvl for lvl in self._read_levels if lvl in REMOTE],
                                _Trouble())
        return None if found is None else bytes(found[1])

    def prefetch(self, keys: Iterable[bytes], workers: int | None = None) -> int:
        """Read ``keys`` so they are promoted (a boot's prefetch set).

        Object stores are latency-bound, so several reads in flight fetch a set
        from cold many times faster than one after another: ``workers`` defaults
        to 8 when a level beyond this host (peers, cold) exists. Local reads are
        CPU-bound (hash, decompress, place) and threads only contend for the GIL
        (256 chunks of 64 KiB from NEBULA: 33 ms in this thread, 50 ms with 8),
        so otherwise they are read in the calling thread. Returns how many were
        read; the first failure is raised (with workers, once the others finished).
        """
        from concurrent.futures import ThreadPoolExecutor

        keys = list(dict.fromkeys(keys))
        if workers is None:
            workers = 8 if any(lvl in REMOTE for lvl in self._read_levels) else 1
        if workers <= 1:
            for k in keys:
                self._fetch(k)
            return len(keys)
        with ThreadPoolExecutor(max_workers=workers,
                                thread_name_prefix="photon-prefetch") as pool:
            futures = [pool.submit(self._fetch, k) for k in keys]
        for f in futures:
            f.result()
        return len(keys)

    def _fetch(self, key: bytes) -> None:
        self.view(key)  # the view itself is not kept: a set may not fit in memory at once

    def contains(self, key: bytes) -> bool:
        """Whether some tier claims ``key`` (unverified; unreachable tiers count as no)."""
        for level in self.levels:
            try:
                if self.tiers[level].contains(key):
                    return True
            except TierUnavailable:
                continue
        return False

    def _after_hit(self, key: bytes, data: memoryview, level: str,
                   corrupt: list[str]) -> memoryview:
        """Repair and promote; best effort, since the reader already has good bytes.
        Returns the view to hand out: the hot copy when the chunk was placed there."""
        score = self.policy.touch(key)
        try:
            for bad in corrupt:  # every corrupt copy is above the good one: rewrite it
                if bad == "peers":
                    continue  # another node's copy: not ours to rewrite
                self.tiers[bad].delete(key)
                if bad != "hot":
                    self.tiers[bad].put(key, data)
            if level in REMOTE and "warm" in self.tiers and score >= self.policy.promote_warm:
                if not self.tiers["warm"].contains(key):
                    self._promoting.active = True  # a cached copy, not a write: no upload
                    try:
                        self.tiers["warm"].put(key, data)
                    finally:
                        self._promoting.active = False
                    self.stats.add("warm", "promoted")
                if level == "cold":
                    self._mark_cold(key)
                self._trim("warm")
        except (StellarError, OSError):
            self.stats.add("warm", "errors")  # e.g. a full disk: serve the read anyway
        if "hot" in self.tiers and (self.policy.pinned(key) or score >= self.policy.promote_hot):
            if self._place_hot(key, data):
                try:
                    placed = self._hot_view(key)
                except TierUnavailable:
                    placed = None
                if placed is not None:
                    return memoryview(placed)
            self._local.put(key, data)  # wanted hot, could not be: verified once all the same
        return data

    # -- placement and eviction ---------------------------------------------------

    def pin(self, keys: Iterable[bytes]) -> None:
        """Keep ``keys`` (a boot-critical set) hot and out of every eviction.

        Raises :class:`TierFull` if the hot tier cannot hold them all.
        """
        keys = list(keys)
        for key in keys:
            self.policy.pin(key)
        if "hot" in self.tiers:
            self.prefetch(k for k in keys if not self.tiers["hot"].contains(k))
        for key in keys:
            self._pin(key, None)

    def _pin(self, key: bytes, data: bytes | memoryview | None) -> None:
        self.policy.pin(key)
        if "hot" in self.tiers:
            self._place_hot(key, self.get(key) if data is None else data, required=True)

    def unpin(self, keys: Iterable[bytes]) -> None:
        """Let ``keys`` be evicted again like any other chunk."""
        for key in keys:
            self.policy.unpin(key)
        with self._lock:
            self._durable_gen += 1

    def _place_hot(self, key: bytes, data: bytes | memoryview, required: bool = False) -> bool:
        hot = self.tiers["hot"]
        if self._hot_closed and not required:
            return False
        with self._lock:
            try:
                if hot.contains(key):
                    return True
                cap = self.capacities.get("hot")
                if cap is not None and len(data) > cap:
                    raise TierFull(f"a {len(data)}-byte chunk exceeds the hot capacity {cap}")
                self._make_room("hot", len(data))
                hot.put(key, data)
            except TierFull as exc:
                if required:
                    raise TierFull(f"chunk {key.hex()} cannot be kept hot: {exc}") from None
                return False
            except TierUnavailable:
                if required:
                    raise
                self.stats.add("hot", "errors")
                self._hot_closed = True  # e.g. read-only to this process: stop trying
                return False
            self.stats.add("hot", "promoted")
            self._placements += 1
            if self._placements % self._pressure_every == 0:
                self.relieve_pressure()
            return True

    def _make_room(self, level: str, need: int) -> None:
        """Evict the coldest evictable chunks of ``level`` until ``need`` more bytes fit."""
        cap = self.capacities.get(level)
        if cap is None:
            return
        tier = self.tiers[level]
        used = tier.usage().used_bytes
        if used + need <= cap:
            return
        if level != "hot" and self._stuck.get(level) == self._durable_gen:
            self.stats.add(level, "over_capacity")  # nothing became evictable since last try
            return
        if getattr(tier, "shared", False):
            # Recency is host-wide and listing costs a scan: evict in the tier's own
            # order (least recently used by any process first), an eighth extra.
            victims = [k for k in tier.keys() if not self.policy.pinned(k)]
            need += cap // 8
        else:
            victims = self.policy.victims(tier.keys())
        for victim in victims:
            used -= self._evict(level, victim)
            if used + need <= cap:
                self._stuck.pop(level, None)
                return
        if level == "hot":
            raise TierFull(f"hot tier: {used} bytes in use are pinned or not yet durable below")
        self._stuck[level] = self._durable_gen
        self.stats.add(level, "over_capacity")

    def _trim(self, level: str) -> None:
        with self._lock:
            self._make_room(level, 0)

    def _evict(self, level: str, key: bytes) -> int:
        """Drop ``key`` from ``level`` if a lower tier holds it durably; bytes freed."""
        tier = self.tiers[level]
        if not self._durable_below(level, key):
            return 0
        before = tier.usage().used_bytes
        tier.delete(key)
        self.stats.add(level, "evicted")
        return before - tier.usage().used_bytes

    def _durable_below(self, level: str, key: bytes) -> bool:
        for lower in self.levels[self.levels.index(level) + 1:]:
            if lower != "cold":
                if self.tiers[lower].contains(key):
                    return True
                continue
            if key in self._in_cold:
                return True
            if self.writeback is not None and self.writeback.is_pending(key):
                return False
            if time.monotonic() < self._cold_retry_at:
                return False  # cold just failed: do not wait on it victim after victim
            try:
                if self.tiers["cold"].contains(key):
                    self._mark_cold(key)
                    return True
            except TierUnavailable:
                self.stats.add("cold", "errors")
                self._cold_retry_at = time.monotonic() + self._max_delay
        return False

    def _mark_cold(self, key: bytes) -> None:
        """``key`` is durable in cold: warm may now drop it."""
        with self._lock:
            if len(self._in_cold) >= IN_COLD_CACHE:
                self._in_cold.clear()  # only a cache: cold itself is asked when unsure
            self._in_cold.add(key)
            self._durable_gen += 1

    def relieve_pressure(self) -> int:
        """Evict hot chunks while MemAvailable is below the watermark; bytes freed."""
        if "hot" not in self.tiers or not self.min_available:
            return 0
        try:
            available = meminfo(self._meminfo_path).get("MemAvailable")
        except OSError:
            return 0
        if available is None or available >= self.min_available:
            return 0
        deficit, freed = self.min_available - available, 0
        with self._lock:
            self.stats.add("hot", "pressure")
            for victim in self.policy.victims(self.tiers["hot"].keys()):
                if freed >= deficit:
                    break
                freed += self._evict("hot", victim)
        return freed

    def demote(self, key: bytes) -> list[str]:
        """Drop ``key`` from every tier above its lowest durable copy; the levels left."""
        left = []
        with self._lock:
            for level in self.levels[:-1]:
                if self.tiers[level].contains(key) and not self.policy.pinned(key):
                    if self._durable_below(level, key):
                        self.tiers[level].delete(key)
                        if not self.tiers[level].contains(key):  # NEBULA may keep it
                            self.stats.add(level, "evicted")
                            left.append(level)
        return left

    # -- write-back ---------------------------------------------------------------

    def _local_copy(self, key: bytes) -> bytes | None:
        """A verified local copy for the write-back worker, or None if none is good."""
        for level in ("warm", "hot"):
            if level in self.tiers:
                try:
                    data = self.tiers[level].get(key)
                except CorruptChunkError:
                    data = None
                    self.stats.add(level, "corrupt")
                if data is not None and self.hasher.digest(data) == key:
                    return data
                if data is not None:
                    self.stats.add(level, "corrupt")
        return None

    def _cold_done(self, key: bytes) -> None:
        self._mark_cold(key)
        self.stats.add("writeback", "uploaded")

    def backfill(self) -> int:
        """Queue every warm chunk that cold lacks (one LIST of cold); how many were queued.

        For chunks that reached warm without :meth:`put`, e.g. volumes writing
        straight into NEBULA, or a journal lost with its disk.
        """
        if self.writeback is None:
            return 0
        in_cold = set(self.tiers["cold"].keys())
        with self._lock:
            self._in_cold |= in_cold
            self._durable_gen += 1
        queued = 0
        for key in list(self.tiers["warm"].keys()):
            if key not in in_cold and not self.writeback.is_pending(key):
                self.writeback.submit(key)
                queued += 1
        return queued

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the write-back queue to drain; save the counters. False on timeout."""
        done = self.writeback.flush(timeout) if self.writeback else True
        self.stats.save()
        return done

    # -- reporting and lifecycle --------------------------------------------------

    def usage(self) -> dict[str, TierUsage]:
        return {lvl: self.tiers[lvl].usage() for lvl in self.levels}

    def report(self) -> dict[str, Any]:
        """Counters of this process by level, plus the write-back state."""
        out: dict[str, Any] = {lvl: self.stats.get(lvl) for lvl in self._read_levels}
        if self.writeback is not None:
            wb = self.writeback
            out["writeback"] = {"pending": wb.pending(), "uploaded": wb.uploaded,
                                "retries": wb.retries, "last_error": wb.last_error}
        return out

    def close(self, timeout: float | None = 30.0) -> bool:
        """Drain write-back for up to ``timeout`` s (the rest stays journalled), close tiers."""
        drained = True
        if self.writeback is not None:
            wb = self.writeback
            drained = wb.close(timeout)
            self.stats.add("writeback", "retries", wb.retries)
        self.stats.save()
        for tier in self.tiers.values():
            tier.close()
        return drained

    def __enter__(self) -> PhotonRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nebula_is_warm(host: Any) -> bool:
    """Whether the host's NEBULA store plays the warm level by default: no
    ``[tiers.warm]`` is configured and the store has been initialised."""
    return "warm" not in host.config.tiers and nebula_exists(host.store_path)


def shm_is_hot(host: Any) -> bool:
    """Whether the host-wide ``shm`` tier plays the hot level by default: no
    ``[tiers.hot]`` is configured."""
    return "hot" not in host.config.tiers


def confined_paths(cfg: Any, *, writes: bool) -> list[tuple[str, bool]]:
    """(path, writable) grants beside the store of host config ``cfg`` for a confined
    process that reads it (and writes it, if ``writes``): the host-wide hot directory
    read-only, if the hot level is ``shm`` (a process that parses untrusted input uses
    chunks trusted processes verified but never places any), and PHOTON's counters,
    writable when this uid owns them (a store writer has them with the store)."""
    from stellarium_core.photon.shm import hot_dir

    hot = cfg.tiers.get("hot")
    out: list[tuple[str, bool]] = []
    if hot is None or hot.plugin == "shm":
        path = hot_dir(cfg.store_path, hot.params if hot else {})
        if path.is_dir():
            out.append((str(path), False))
    counters = str(cfg.store_path / "tiers")
    if not writes and _owned(counters):
        out.append((counters, True))
    return out


def _owned(tree: str) -> bool:
    """Whether ``tree`` exists and all of it belongs to this uid: what a process without
    capabilities can write (for root, os.access would say yes to anything)."""
    paths = [os.path.join(top, f) for top, _d, files in os.walk(tree) for f in ["", *files]]
    try:
        return bool(paths) and all(os.lstat(p).st_uid == os.geteuid() for p in paths)
    except OSError:
        return False


def from_host(host: Any, *, nebula_warm: bool | None = None, shm_hot: bool | None = None,
              **kw: Any) -> PhotonRouter:
    """The router for a :class:`~stellarium_core.host.Host`'s configured tiers.

    Capacities come from ``[tiers.<level>] capacity``; the MemAvailable
    watermark from the hot backend's ``min_available`` when it has one. The
    host's NEBULA store is the warm level when ``nebula_warm`` is true, or when
    it is None (the default), no ``[tiers.warm]`` is configured and the store
    has been initialised. Likewise the host-wide ``shm`` tier is the hot level
    unless ``[tiers.hot]`` names another (or ``shm_hot`` is false). A hot tier
    shared by the host takes a chunk on its first read: any later reader, in
    any process, is then spared verifying and decompressing it.
    """
    tiers = dict(host.tiers)
    if nebula_warm is None:
        nebula_warm = nebula_is_warm(host)
    if nebula_warm:
        if "warm" in tiers:
            raise StellarError("the warm level is configured ([tiers.warm]); it cannot also "
                               "be the NEBULA store")
        tiers["warm"] = NebulaTier(host.store, host.store_path / RECORDS)
    if shm_hot is None:
        shm_hot = shm_is_hot(host)
    if shm_hot and "hot" not in tiers:
        tiers["hot"] = host.shm_tier()
    if not tiers:
        raise StellarError("no tiers are configured (add [tiers.hot|warm|cold] to the host "
                           "config)")
    kw.setdefault("capacities", {lvl: t.capacity for lvl, t in host.config.tiers.items()})
    kw.setdefault("state_dir", host.store_path / "tiers")
    if "hot" in tiers:
        kw.setdefault("min_available", getattr(tiers["hot"], "min_available", None))
        if getattr(tiers["hot"], "shared", False):
            kw.setdefault("policy", Policy(promote_hot=1.0))
    cluster = host.config.cluster
    if cluster["peers"]:
        from stellarium_core.photon.peers import PeerTier

        kw.setdefault("peers", PeerTier(cluster["node"], cluster["peers"], host.hasher,
                                        fanout=cluster["fanout"], timeout=cluster["timeout"]))
    return PhotonRouter(tiers, host.hasher, **kw)
