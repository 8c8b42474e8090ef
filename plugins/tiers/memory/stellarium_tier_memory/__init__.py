"""The ``memory`` tier: hot chunks in anonymous mmaps, capped at ``capacity`` bytes.

Each chunk gets its own anonymous private mapping, so freeing a chunk returns
its pages to the kernel at once (no arena fragmentation to manage) and the
Python heap never holds the hot set. The tier is volatile by nature: PHOTON
keeps a durable copy below it before it counts a chunk as stored.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from typing import Any

from stellarium_core.config import Field, at_least, validate_params
from stellarium_core.hookspecs import TierContext, TierFull, TierUsage, hookimpl

FIELDS = {
    "capacity": Field("size", 256 << 20, at_least(1), doc="most bytes of chunk data held"),
    "min_available": Field("size", None, doc="PHOTON evicts hot chunks while the host's "
                                             "MemAvailable is below this (default: 5% of "
                                             "MemTotal; 0: never)"),
}


class MemoryTier:
    """A capped in-memory map digest -> anonymous mmap holding the chunk."""

    name = "memory"

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = validate_params(params, FIELDS)
        self.capacity: int = self.params["capacity"]
        self.min_available: int | None = self.params["min_available"]
        self._maps: dict[bytes, tuple[mmap.mmap, int]] = {}
        self._used = 0
        self._lock = threading.Lock()

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        n = len(data)
        with self._lock:
            if key in self._maps:
                return
            if self._used + n > self.capacity:
                raise TierFull(f"memory tier: {n} more bytes exceed its capacity of "
                               f"{self.capacity} ({self._used} in use)")
            m = mmap.mmap(-1, max(n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m[:n] = data
            self._maps[key] = (m, n)
            self._used += n

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            entry = self._maps.get(key)
            return None if entry is None else entry[0][: entry[1]]

    def contains(self, key: bytes) -> bool:
        return key in self._maps

    def delete(self, key: bytes) -> None:
        with self._lock:
            entry = self._maps.pop(key, None)
            if entry is not None:
                self._used -= entry[1]
                entry[0].close()

    def keys(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._maps))

    def usage(self) -> TierUsage:
        with self._lock:
            return TierUsage(len(self._maps), self._used, self.capacity)

    def close(self) -> None:
        with self._lock:
            for m, _ in self._maps.values():
                m.close()
            self._maps.clear()
            self._used = 0


@hookimpl
def stellarium_tier(name: str, params: dict[str, Any], context: TierContext) -> MemoryTier | None:
    return MemoryTier(params) if name == "memory" else None
