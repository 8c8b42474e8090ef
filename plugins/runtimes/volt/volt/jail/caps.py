"""Give up every capability: a VMM that is set up needs none, even when started as root.

Without CAP_SYS_MODULE, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYS_RAWIO... module
loading, mounts, ptrace and raw I/O fail with EPERM even where seccomp only logs.
The bounding set goes too, so no later exec (of a setuid or root binary) could
bring them back. Capabilities are per thread: call this while single-threaded.
"""

from __future__ import annotations

import ctypes
import os

PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_LAST_POSSIBLE = 63

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def drop_all() -> None:
    """Clear the bounding, ambient, effective, permitted and inheritable sets."""
    for cap in range(CAP_LAST_POSSIBLE + 1):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            # EINVAL: past the kernel's last capability. EPERM: no CAP_SETPCAP (not root);
            # the permitted set is cleared below and no_new_privs stops exec from refilling it.
            break
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    data = (_Data * 2)()
    _check(_libc.capset(ctypes.byref(_Header(LINUX_CAPABILITY_VERSION_3, 0)), data), "capset")

