"""Keep the VMM's C heap small: what a VM keeps of its own is what limits density.

glibc gives each thread that allocates its own malloc arena (up to 8 per core), and
every arena keeps the pages it ever touched. A VMM has several threads (vCPUs, I/O,
API) that allocate little, under the GIL, so one arena serves them all. The build
(reading the kernel, parsing configs, opening stores) frees megabytes the heap keeps
resident unless trimmed. On a C library without these calls (not glibc) both are
no-ops.
"""

from __future__ import annotations

import ctypes

#: mallopt's parameter for the most arenas (glibc's malloc.h).
M_ARENA_MAX = -8

_libc = ctypes.CDLL(None)
_mallopt = getattr(_libc, "mallopt", None)
_malloc_trim = getattr(_libc, "malloc_trim", None)


def one_arena() -> bool:
    """Make every thread started from now on allocate from the main arena."""
    return bool(_mallopt is not None and _mallopt(M_ARENA_MAX, 1))


def trim() -> bool:
    """Give the heap's free pages back to the kernel; True if any were returned."""
    return bool(_malloc_trim is not None and _malloc_trim(0))
