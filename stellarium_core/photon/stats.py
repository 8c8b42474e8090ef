"""Per-tier counters, kept for the process and added to a JSON file under <store>/tiers/.

The file holds running totals across processes; a router adds what it counted
since it last saved. Writes are tmp+rename, so a reader never sees half a file.
Two routers saving at once may lose one's increments, never corrupt the file.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from stellarium_core.fsutil import write_atomic

#: Counters each tier level carries.
FIELDS = ("hits", "misses", "corrupt", "errors", "promoted", "evicted")
STATS_FILE = "stats.json"


def hit_rate(counters: dict[str, int]) -> float | None:
    """Hits over lookups at this tier, or None before the first lookup."""
    looked = counters.get("hits", 0) + counters.get("misses", 0)
    return counters.get("hits", 0) / looked if looked else None


def load(path: Path) -> dict[str, dict[str, int]]:
    """The totals in ``path`` (empty if the file is absent or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): {f: int(n) for f, n in v.items() if isinstance(n, int)}
            for k, v in data.items() if isinstance(v, dict)}


class Stats:
    """Thread-safe counters by section (a tier level, or ``writeback``)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._now: dict[str, Counter[str]] = {}
        self._unsaved: dict[str, Counter[str]] = {}
        self._lock = threading.Lock()

    def add(self, section: str, field: str, n: int = 1) -> None:
        """Count ``n`` ``field`` events (every read of every chunk passes here)."""
        with self._lock:
            for counters in (self._now, self._unsaved):
                c = counters.get(section)
                if c is None:
                    c = counters[section] = Counter()
                c[field] += n

    def get(self, section: str) -> dict[str, int]:
        """This process's counts for ``section``."""
        with self._lock:
            c = self._now.get(section, Counter())
            return {f: c.get(f, 0) for f in sorted(set(FIELDS) | set(c))}

    def save(self) -> None:
        """Add the unsaved counts to the totals file; kept for the next try if it
        cannot be written (a read-only store, a confined process)."""
        if self.path is None:
            return
        with self._lock:
            totals = load(self.path)
            for section, counts in self._unsaved.items():
                t = totals.setdefault(section, {})
                for f, n in counts.items():
                    t[f] = t.get(f, 0) + n
            try:
                self.path.parent.mkdir(exist_ok=True)  # <store>/tiers, in a store made before it
                write_atomic(self.path,
                             (json.dumps(totals, indent=2, sort_keys=True) + "\n").encode(),
                             durable=False)
            except OSError:
                return
            self._unsaved.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {s: dict(c) for s, c in self._now.items()}
