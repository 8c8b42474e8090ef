"""When this process started, on the monotonic clock (for setup-time figures)."""

from __future__ import annotations

import os
import time

#: Fallback when /proc is not mounted: the moment this module was imported.
_IMPORTED = time.monotonic()


def _process_start() -> float:
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return _IMPORTED
    age = uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - age


#: Read at import, before the VMM confines itself (Landlock then hides /proc).
_START = _process_start()


def process_start() -> float:
    """Process start as a ``time.monotonic()`` value, from /proc/self/stat if mounted."""
    return _START
