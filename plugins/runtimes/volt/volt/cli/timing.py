"""When this process started, on the monotonic clock (for setup-time figures)."""

from __future__ import annotations

import os
import time


def process_start() -> float:
    """Process start as a ``time.monotonic()`` value, from /proc/self/stat."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    now = time.monotonic()
    age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return now - age
