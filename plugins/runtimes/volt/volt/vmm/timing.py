"""When this process started, on the monotonic clock, and where its setup time went.

``volt run --timing`` prints setup (process start to first KVM_RUN) split into
phases: each :func:`mark` ends the phase named, which began where the previous
one ended (the first began at process start). bench/boot reads that line.
"""

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
#: Phase ends in order; the entry imports this module first, so its import ends the
#: interpreter's own start-up.
_MARKS: list[tuple[str, float]] = [("interpreter", _IMPORTED)]


def process_start() -> float:
    """Process start as a ``time.monotonic()`` value, from /proc/self/stat if mounted."""
    return _START


def mark(phase: str) -> None:
    """``phase`` ends now (a phase marked twice, say by a second VM, keeps its first end)."""
    if all(name != phase for name, _ in _MARKS):
        _MARKS.append((phase, time.monotonic()))


def phases(until: float) -> list[tuple[str, float]]:
    """(phase, milliseconds) from process start; the rest up to ``until`` is ``start``."""
    out, prev = [], _START
    for name, t in [*_MARKS, ("start", until)]:
        out.append((name, 1000 * max(t - prev, 0.0)))
        prev = max(prev, t)
    return out


def restart() -> None:
    """This process was forked to run a VM (``volt serve``): its setup starts now, and
    the phases start over (the interpreter and the imports were the server's)."""
    global _START
    _START = time.monotonic()
    _MARKS[:] = [("interpreter", _START)]
