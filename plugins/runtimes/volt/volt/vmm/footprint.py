"""Keep the VMM's own memory small: what a VM keeps of its own is what limits density.

- glibc gives each thread that allocates its own malloc arena (up to 8 per core), and
  every arena keeps the pages it ever touched. A VMM has several threads (vCPUs, I/O,
  API) that allocate little, under the GIL, so one arena serves them all.
- With transparent huge pages "always" (Debian's default), the first touch of a thread
  stack or an aligned anonymous region takes a whole 2 MiB page: measured in the lab,
  one such page in most VMs forked from ``volt serve``. The VMM's own memory needs none;
  guest RAM in hugetlbfs (``--hugepages``) is not affected.
- The build (reading the kernel, parsing configs, opening stores) frees megabytes the
  heap keeps resident unless trimmed.

Both limits are process-wide and the huge-page one is inherited by children, so only a
process that exists to run one VM takes them (``volt run``, ``volt-vmm``, the children
of ``volt serve``: :func:`volt.api.launch`); trimming is harmless anywhere. On a C
library without these calls (not glibc) the malloc ones are no-ops.
"""

from __future__ import annotations

import ctypes

#: mallopt's parameter for the most arenas (glibc's malloc.h).
M_ARENA_MAX = -8
#: prctl option: no transparent huge pages for this process and its children.
PR_SET_THP_DISABLE = 41

_libc = ctypes.CDLL(None, use_errno=True)
_mallopt = getattr(_libc, "mallopt", None)
_malloc_trim = getattr(_libc, "malloc_trim", None)


def limit() -> None:
    """From now on: every thread allocates from the main arena, and no anonymous memory
    of this process is backed by transparent huge pages."""
    if _mallopt is not None:
        _mallopt(M_ARENA_MAX, 1)
    _libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)   # EINVAL only before Linux 3.15


def trim() -> bool:
    """Give the heap's free pages back to the kernel; True if any were returned."""
    return bool(_malloc_trim is not None and _malloc_trim(0))
