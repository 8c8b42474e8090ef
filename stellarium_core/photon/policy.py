"""Which chunks deserve a faster tier: frequency and recency in one decaying score.

Each access adds 1 to a chunk's score, and scores halve every ``half_life``
accesses to the router (a logical clock, so placement does not depend on wall
time and is reproducible). A chunk read often and lately scores high; one read
many times long ago decays toward zero. Pinned chunks (boot-critical sets)
are never eviction candidates. The defaults copy a chunk from cold to warm on
its first read and into hot on its second read within about a half-life.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Policy:
    """Decayed access counts, promotion thresholds and pins."""

    def __init__(self, half_life: int = 4096, promote_hot: float = 1.5,
                 promote_warm: float = 1.0, max_tracked: int = 1 << 20) -> None:
        if half_life < 1 or max_tracked < 2:
            raise ValueError("half_life must be at least 1 access, max_tracked at least 2")
        self.max_tracked = max_tracked
        self.half_life = half_life
        self.promote_hot = promote_hot
        self.promote_warm = promote_warm
        self._clock = 0
        self._scores: dict[bytes, tuple[float, int]] = {}
        self._pins: set[bytes] = set()
        self._lock = threading.Lock()

    def _decayed(self, entry: tuple[float, int] | None) -> float:
        if entry is None:
            return 0.0
        score, at = entry
        return score * 2.0 ** (-(self._clock - at) / self.half_life)

    def touch(self, key: bytes) -> float:
        """Record one access to ``key`` and return its new score."""
        with self._lock:
            self._clock += 1
            score = self._decayed(self._scores.get(key)) + 1.0
            self._scores[key] = (score, self._clock)
            if len(self._scores) > self.max_tracked:
                self._prune()
            return score

    def _prune(self) -> None:
        """Keep the hotter half of the history, so memory stays bounded."""
        ranked = sorted(self._scores, key=lambda k: self._decayed(self._scores[k]))
        for k in ranked[: len(ranked) // 2]:
            del self._scores[k]

    def score(self, key: bytes) -> float:
        with self._lock:
            return self._decayed(self._scores.get(key))

    def pin(self, key: bytes) -> None:
        with self._lock:
            self._pins.add(key)

    def unpin(self, key: bytes) -> None:
        with self._lock:
            self._pins.discard(key)

    def pinned(self, key: bytes) -> bool:
        return key in self._pins

    @property
    def pins(self) -> frozenset[bytes]:
        return frozenset(self._pins)

    def victims(self, keys: Iterable[bytes]) -> list[bytes]:
        """Unpinned ``keys``, coldest first: the order to evict them in."""
        with self._lock:
            ranked = [(self._decayed(self._scores.get(k)), k) for k in keys
                      if k not in self._pins]
        ranked.sort(key=lambda t: t[0])
        return [k for _, k in ranked]
