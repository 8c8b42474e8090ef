"""Landlock through ctypes: the filesystem (ABI 1-3, 5) and TCP (ABI 4+) rules of one VMM.

Why ctypes and not a binding: PyPI's ``landlock`` (1.0.0.dev5) handles only
filesystem rules, so it cannot express ABI 4's TCP bind/connect; the kernel
interface is three syscalls and three structs, small enough to own.

Rights a running kernel does not know are dropped from the ruleset, so one
policy works on every ABI; :class:`Enforced` says what was actually restricted.
The VMM needs no TCP at all, so from ABI 4 on every TCP bind and connect is
denied (no port rule is added).
A domain is per thread and inherited by threads created later, so it must be
entered while the process is single-threaded (the caller checks).
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from volt.jail.policy import Policy

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

# Filesystem rights (include/uapi/linux/landlock.h), by the ABI that added them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

#: What a path grant means in rights (masked by the running ABI).
READ = READ_FILE | READ_DIR
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | REFER | TRUNCATE)
DEVICE = READ_FILE | WRITE_FILE | IOCTL_DEV
#: Rights that only make sense on a directory (the kernel rejects them on a file).
DIR_ONLY = READ_DIR | REMOVE_DIR | REMOVE_FILE | MAKE_CHAR | MAKE_DIR | MAKE_REG | MAKE_SOCK \
    | MAKE_FIFO | MAKE_BLOCK | MAKE_SYM | REFER

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockError(OSError):
    """Landlock is missing, disabled, or refused the ruleset."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(nr: int, *args: object) -> int:
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, os.strerror(err))
    return ret


def abi_version() -> int:
    """The Landlock ABI the running kernel offers; 0 when it has none (or it is disabled)."""
    try:
        return _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                        ctypes.c_uint32(CREATE_RULESET_VERSION))
    except LandlockError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return 0
        raise


#: Why Landlock is unusable here, for the error a user sees.
MISSING = ("this kernel has no Landlock (it needs Linux 5.13+ built with "
           "CONFIG_SECURITY_LANDLOCK and 'landlock' in the lsm= boot parameter)")


@dataclass
class Enforced:
    """What one restrict_self actually covers on this kernel."""

    abi: int
    filesystem: bool
    tcp: bool
    scoped: bool
    rules: int

    def describe(self) -> str:
        parts = ["filesystem"] + (["tcp bind/connect"] if self.tcp else []) \
            + (["signals + abstract unix sockets"] if self.scoped else [])
        return f"landlock ABI {self.abi}: {', '.join(parts)} ({self.rules} rules)"


def fs_rights(abi: int) -> int:
    """Every filesystem right the ABI knows (all are handled: what is not granted is denied)."""
    return FS_BY_ABI[max(k for k in FS_BY_ABI if k <= abi)]


def restrict(policy: Policy) -> Enforced:
    """Enter a Landlock domain that allows only what ``policy`` lists; irreversible."""
    abi = abi_version()
    if abi == 0:
        raise LandlockError(errno.EOPNOTSUPP, MISSING)
    fs = fs_rights(abi)
    attr = _RulesetAttr(handled_access_fs=fs)
    size = ctypes.sizeof(ctypes.c_uint64)
    if abi >= 4:
        attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP
        size += ctypes.sizeof(ctypes.c_uint64)
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        size += ctypes.sizeof(ctypes.c_uint64)
    ruleset = _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    rules = 0
    try:
        for path, access in policy.grants(READ, WRITE, DEVICE):
            _add_path(ruleset, path, access & fs)
            rules += 1
        os.set_inheritable(ruleset, False)
        _libc.prctl(38, 1, 0, 0, 0)          # PR_SET_NO_NEW_PRIVS: required without CAP_SYS_ADMIN
        _syscall(SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return Enforced(abi, True, abi >= 4, abi >= 6, rules)


def _add_path(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not os.path.isdir(path):
            access &= ~DIR_ONLY
        rule = _PathBeneath(allowed_access=access, parent_fd=fd)
        try:
            _syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        except LandlockError as exc:
            raise LandlockError(exc.errno, f"landlock rule for {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
