"""The VMM's own memory: one malloc arena for all its threads, no transparent huge pages,
and the heap's freed pages given back.

Each case runs in a fresh interpreter: glibc's arena limit and heap are process-wide."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

ARENAS = textwrap.dedent("""
    import ctypes, sys, threading
    from volt.vmm import footprint
    if sys.argv[1] == "one":
        footprint.limit()
    alive = threading.Barrier(5)
    def work():
        keep = [bytes(1000 + i) for i in range(100)]   # malloc, not pymalloc
        alive.wait()                                   # all four threads hold an arena
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    alive.wait()
    for t in threads:
        t.join()
    ctypes.CDLL(None).malloc_stats()                   # "Arena N:" per arena, on stderr
""")

TRIM = textwrap.dedent("""
    from volt.vmm import footprint
    def heap_kib():
        kib, inside = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if not head[0].endswith(":"):
                inside = line.rstrip().endswith("[heap]")
            elif inside and head[0] == "Private_Dirty:":
                kib += int(head[1])
        return kib
    keep = [bytes(2000) for _ in range(20000)]        # 40 MB of the heap
    last = bytes(2000)                                 # pins the top: only a trim frees below
    del keep
    before = heap_kib()
    assert footprint.trim()
    print(before, heap_kib())
""")


THP = textwrap.dedent("""
    import ctypes
    from volt.vmm import footprint
    def thp():
        return next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("THP_enabled:"))
    # a parent that limited itself (a test that ran a VM in-process) passed it down
    ctypes.CDLL(None).prctl(footprint.PR_SET_THP_DISABLE, 0, 0, 0, 0)
    before = thp()
    footprint.limit()
    print(before, thp())
""")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, check=True, timeout=60)


@pytest.mark.parametrize("mode, arenas", [("one", 1), ("many", 5)])
def test_threads_share_the_main_arena_once_asked(mode: str, arenas: int) -> None:
    err = _run(ARENAS, mode).stderr
    assert err.count("Arena ") == arenas, err


def test_trim_gives_the_freed_heap_back() -> None:
    before, after = map(int, _run(TRIM).stdout.split())
    assert before > 30 << 10 and after < before - (30 << 10), (before, after)


def test_no_transparent_huge_pages_once_limited() -> None:
    assert _run(THP).stdout.split() == ["1", "0"]
