"""Firecracker-style metrics: one JSON object per line to ``metrics_path``.

A line is written on the FlushMetrics action, every :data:`FLUSH_SECONDS` while the VM
runs, and once when it ends. Where Firecracker's counters restart at every flush,
Volt's lines carry totals since the VMM started, so a line lost to a full pipe loses
nothing (a reader differences consecutive lines for rates). The file or named pipe
is opened when metrics are configured, before the VMM confines itself; writing
needs no more than ``write``, which every thread kind may call.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections import Counter
from typing import Any

from stellarium_core.errors import ConfigError

FLUSH_SECONDS = 60.0


def open_output(path: str) -> int:
    """An fd that appends to ``path``: a named pipe opened without waiting for a reader
    (a full pipe then loses lines, never blocks the VMM), else a file, created if missing."""
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None


class Metrics:
    """Boot phases, API request counts and the metrics output of one VMM process."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._fd: int | None = None
        self._next = 0.0
        self._lock = threading.Lock()
        #: Boot milestones, ``time.monotonic()`` values (see :meth:`mark`).
        self.phases: dict[str, float] = {}
        #: ``{method}_api_requests`` -> ``{resource}_count`` / ``{resource}_fails``.
        self.api: dict[str, Counter[str]] = {}
        self.lines = 0
        self.lost_lines = 0

    def configure(self, path: str) -> None:
        """Send metrics to ``path`` (once per process, as in Firecracker)."""
        if self._fd is not None:
            raise ConfigError("Reinitialization of metrics not allowed.")
        self._fd, self.path = open_output(path), path
        self._next = time.monotonic() + FLUSH_SECONDS

    @property
    def configured(self) -> bool:
        return self._fd is not None

    def mark(self, phase: str, at: float | None = None) -> None:
        """Record when a boot phase was reached (the first time only)."""
        self.phases.setdefault(phase, time.monotonic() if at is None else at)

    def count_api(self, method: str, path: str, ok: bool) -> None:
        resource = (path.strip("/").split("/")[0] or "instance_info").replace("-", "_")
        group = self.api.setdefault(f"{method.lower()}_api_requests", Counter())
        group[f"{resource}_count"] += 1
        if not ok:
            group[f"{resource}_fails"] += 1

    def due(self) -> bool:
        return self._fd is not None and time.monotonic() >= self._next

    def write(self, line: dict[str, Any]) -> bool:
        """Append ``line`` (plus the writer's own counts) as one JSON line; False if lost."""
        with self._lock:
            if self._fd is None:
                return False
            self._next = time.monotonic() + FLUSH_SECONDS
            line = {**line, "metrics": {"lines": self.lines + 1, "lost_lines": self.lost_lines}}
            data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
            try:
                if os.write(self._fd, data) == len(data):
                    self.lines += 1
                    return True
            except OSError:
                pass
            self.lost_lines += 1
            return False
