"""A bounded LRU of chunk views for one process (thread-safe).

Used where a process keeps chunks it can hand out without touching a tier again:
the hot tier's mappings of shared chunks, and the router's verified views of
chunks it could not place hot. Dropping a view never invalidates one already
handed out; its memory goes when the last view of it does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict


class ViewCache:
    """At most ``max_items`` views and ``max_bytes`` bytes of them (None: no bound)."""

    def __init__(self, *, max_items: int | None = None, max_bytes: int | None = None) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._views: OrderedDict[bytes, memoryview] = OrderedDict()
        self._bytes = 0
        self._mu = threading.Lock()

    def get(self, key: bytes) -> memoryview | None:
        with self._mu:
            mv = self._views.get(key)
            if mv is not None:
                self._views.move_to_end(key)
            return mv

    def put(self, key: bytes, view: memoryview) -> None:
        with self._mu:
            old = self._views.pop(key, None)
            self._bytes += len(view) - (len(old) if old is not None else 0)
            self._views[key] = view
            while len(self._views) > 1 and (
                    (self.max_items is not None and len(self._views) > self.max_items)
                    or (self.max_bytes is not None and self._bytes > self.max_bytes)):
                _, dropped = self._views.popitem(last=False)
                self._bytes -= len(dropped)

    def pop(self, key: bytes) -> None:
        with self._mu:
            old = self._views.pop(key, None)
            if old is not None:
                self._bytes -= len(old)

    def clear(self) -> None:
        with self._mu:
            self._views.clear()
            self._bytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._views

    def __len__(self) -> int:
        return len(self._views)
