"""seccomp-BPF allowlists per thread kind, compiled by libseccomp through pyseccomp.

Why pyseccomp: libseccomp resolves syscall names, checks the architecture of
every call (an x32 or i386 syscall cannot sneak past a number check) and builds
an optimised BPF tree; pyseccomp is a thin ctypes layer over it that needs no
compiler. Filters are built while the process may still load libraries, and
each thread loads only its own (``load`` is per thread: filters stack, so a
thread is held to the intersection of ``main`` and its kind).

The default action kills the whole process and the kernel logs it (audit
type=1326 with the syscall number and the thread's name); ``log`` lets the call
through and logs the same line, for finding a missing rule. The lists were
measured with ``strace -f`` on tiny guests here and on a Linux boot with
virtio-stellar devices in the lab.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from typing import Any

from volt.vmm import kvm

#: A rule: a syscall, optionally with one argument check (index, mask, value).
Rule = tuple[str, tuple[int, int, int] | None]

#: What any Python thread does: memory, locks, signals, time, its own exit.
PYTHON = ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "futex", "getpid",
          "gettid", "getrandom", "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
          "clock_gettime", "clock_nanosleep", "nanosleep", "sched_yield", "restart_syscall",
          "exit", "exit_group", "set_robust_list", "rseq", "close", "fstat", "newfstatat",
          "lseek", "read", "write", "tgkill:SELF")
#: What device models do with host files (Stellarium stores), eventfds and a back-end's
#: socket. Python's open() asks every file whether it is a terminal (TCGETS) to pick
#: its buffering.
#: Devices change what the event loop watches from any thread (virtio-net stops reading
#: its tap on reset, in a vCPU thread: epoll_ctl) and arm their timers (virtio-rng's
#: rate limit, virtio-balloon's statistics: timerfd_settime; the fd is made at build).
DEVICE = ("openat", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
          "readv", "writev", "fsync", "fdatasync", "flock", "fcntl", "ftruncate", "fallocate",
          "statx", "getdents64", "rename", "renameat", "renameat2", "unlink", "unlinkat",
          "mkdir", "mkdirat", "eventfd2", "ioctl:FIONREAD", "ioctl:TCGETS", "epoll_ctl",
          "timerfd_settime",
          # a device whose back-end is another process (vhost-user) talks to it over its
          # unix socket, connected before confinement: messages with fds, with a timeout
          "sendto", "sendmsg", "recvfrom", "recvmsg", "poll", "ppoll")
#: virtio-net's activation and reset, in the vCPU thread that wrote the status register:
#: the tap's offloads (TUNSETOFFLOAD) and, with vhost=on, handing the rings to
#: /dev/vhost-net (opened and owned at build time).
NET_IOCTLS = ("ioctl:TUNSETOFFLOAD", "ioctl:VHOST_SET_FEATURES", "ioctl:VHOST_SET_MEM_TABLE",
              "ioctl:VHOST_SET_VRING_NUM", "ioctl:VHOST_SET_VRING_ADDR",
              "ioctl:VHOST_SET_VRING_BASE", "ioctl:VHOST_SET_VRING_KICK",
              "ioctl:VHOST_SET_VRING_CALL", "ioctl:VHOST_NET_SET_BACKEND")
#: virtio-vsock in the I/O thread: host programs connect to its unix socket (accept4),
#: guest connections become unix connections to <uds_path>_PORT (socket, connect), and
#: the streams move both ways (DEVICE's sendmsg/recvmsg) and are half-closed (shutdown).
#: Python's accept() asks the new socket its name, and setblocking() is FIONBIO.
VSOCK = ("accept4", "socket:AF_UNIX", "connect", "shutdown", "getsockname", "ioctl:FIONBIO")
#: KVM ioctls a vCPU thread makes while the guest runs (exits, pause probes, irq lines).
VCPU_IOCTLS = ("RUN", "GET_REGS", "SET_REGS", "GET_SREGS", "SET_SREGS", "GET_MP_STATE",
               "IRQ_LINE")
#: The I/O thread: its epoll loop, eventfd reads/writes, and KVM_IRQ_LINE without irqfd.
IO_LOOP = ("epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait")
#: An API server thread on a unix socket (the REST API): accept, read, answer; a balloon
#: statistics interval set through it arms the device's timer.
API = ("accept4", "recvfrom", "recvmsg", "sendto", "sendmsg", "shutdown", "getsockopt",
       "setsockopt", "getsockname", "getpeername", "epoll_create1", "epoll_ctl", "epoll_wait",
       "epoll_pwait", "poll", "ppoll", "timerfd_settime")
#: The main thread: starts threads (clone with CLONE_THREAD only) which name themselves
#: and load their filters (prctl and seccomp run under main's filter), handles signals,
#: opens unix sockets; the process exit path.
MAIN = ("clone:THREAD", "seccomp", "prctl:SET_NAME", "prctl:SET_NO_NEW_PRIVS",
        "prctl:SET_SECCOMP", "rt_sigaction", "wait4", "poll", "ppoll", "select", "pselect6",
        "socket:AF_UNIX", "connect", "bind", "listen", "getsockname", "sysinfo", "uname",
        "getcwd", "dup", "dup3")

CLONE_THREAD = 0x10000
FIONREAD, TCGETS, FIONBIO = 0x541B, 0x5401, 0x5421
U32 = 0xFFFFFFFF


def _vhost(nr: int, size: int) -> int:
    """_IOW(VHOST_VIRTIO, nr, size) of <linux/vhost.h>."""
    return (1 << 30) | (size << 16) | (0xAF << 8) | nr


#: ioctl request numbers (<linux/if_tun.h>, <linux/vhost.h>) virtio-net uses at run time.
NET_IOCTL_NUMBERS = {"TUNSETOFFLOAD": 0x400454D0, "VHOST_SET_FEATURES": _vhost(0x00, 8),
                     "VHOST_SET_MEM_TABLE": _vhost(0x03, 8),
                     "VHOST_SET_VRING_NUM": _vhost(0x10, 8),
                     "VHOST_SET_VRING_ADDR": _vhost(0x11, 40),
                     "VHOST_SET_VRING_BASE": _vhost(0x12, 8),
                     "VHOST_SET_VRING_KICK": _vhost(0x20, 8),
                     "VHOST_SET_VRING_CALL": _vhost(0x21, 8),
                     "VHOST_NET_SET_BACKEND": _vhost(0x30, 8)}
#: The argument checks named after a colon above.
#: SELF is this process's pid, filled in when the filters are built: signals (vCPU
#: kicks) may go to the VMM's own threads only.
SELF = -1
CHECKS = {"clone:THREAD": (0, CLONE_THREAD, CLONE_THREAD), "socket:AF_UNIX": (0, U32, 1),
          "prctl:SET_NAME": (0, U32, 15), "prctl:SET_SECCOMP": (0, U32, 22),
          "prctl:SET_NO_NEW_PRIVS": (0, U32, 38),
          "ioctl:FIONREAD": (1, U32, FIONREAD), "ioctl:TCGETS": (1, U32, TCGETS),
          "ioctl:FIONBIO": (1, U32, FIONBIO),
          "tgkill:SELF": (0, U32, SELF),
          **{f"ioctl:{name}": (1, U32, nr) for name, nr in NET_IOCTL_NUMBERS.items()}}


def _rules(names: Iterable[str]) -> list[Rule]:
    return [(n.partition(":")[0], CHECKS.get(n)) for n in names]


def _ioctls(names: Iterable[str]) -> list[Rule]:
    return [("ioctl", (1, U32, getattr(kvm, n))) for n in names]


#: Thread kind -> its allowlist. ``main`` is loaded on the whole process first, so it
#: is the union of every kind plus what only the main thread does.
_THREADS: dict[str, list[Rule]] = {
    "vcpu": _rules(PYTHON + DEVICE + NET_IOCTLS) + _ioctls(VCPU_IOCTLS),
    "io": _rules(PYTHON + DEVICE + IO_LOOP + VSOCK) + _ioctls(("IRQ_LINE",)),
    "api": _rules(PYTHON + API),
}
KINDS: dict[str, list[Rule]] = {
    "main": list(dict.fromkeys([r for rules in _THREADS.values() for r in rules]
                               + _rules(MAIN))),
    **_THREADS,
}


def rule_count(kind: str) -> int:
    """Rules in ``kind``'s filter (one per syscall, or per allowed argument value)."""
    return len(KINDS[kind])


#: Sonames of the libraries pyseccomp looks up, as Debian ships them.
SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _pyseccomp() -> Any:
    """pyseccomp, imported without its ``ldconfig -p`` runs.

    At import it calls ``ctypes.util.find_library`` for libc and libseccomp, which
    forks ``ldconfig`` each time (about 14 ms of a VMM's start-up). The dynamic
    loader finds a library by its soname through the same ld.so.cache, so the known
    sonames are tried with dlopen first; any other answer comes from the real lookup.
    """
    import sys

    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    import ctypes
    import ctypes.util

    real = ctypes.util.find_library

    def by_soname(name: str) -> str | None:
        soname = SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return real(name)

    ctypes.util.find_library = by_soname
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


def build_all(mode: str) -> dict[str, Any]:
    """Compile every kind's filter for ``mode`` (``kill`` or ``log``); load them later."""
    sc = _pyseccomp()

    default = sc.KILL_PROCESS if mode == "kill" else sc.LOG
    out = {}
    for kind, rules in KINDS.items():
        f = sc.SyscallFilter(default)
        for call, check in rules:
            if check and check[2] == SELF:
                check = (check[0], check[1], os.getpid())
            args = [sc.Arg(check[0], sc.MASKED_EQ, check[1], check[2])] if check else []
            f.add_rule(sc.ALLOW, call, *args)
        if kind == "main":
            # glibc tries clone3 first and falls back to clone on ENOSYS; clone3's flags
            # live in memory a filter cannot read, so it is refused, never allowed.
            f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        out[kind] = f
    return out


def syscall_name(nr: int) -> str:
    """``execve (59)`` for 59: libseccomp knows the names of this architecture."""
    sc = _pyseccomp()

    try:
        return f"{sc.resolve_syscall(sc.Arch.NATIVE, nr).decode()} ({nr})"
    except (OSError, ValueError):
        return f"syscall {nr}"


_AUDIT = re.compile(r"audit: type=1326 .*? pid=(\d+) .*?comm=\"([^\"]*)\".*? sig=(\d+) "
                    r".*?syscall=(\d+)")


def kernel_log() -> str:
    """The kernel's ring buffer as text (messages only), read from /dev/kmsg."""
    lines = []
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:              # EPIPE: a record was overwritten meanwhile
                continue
            lines.append(rec.decode(errors="replace").partition(";")[2].rstrip("\n"))
    finally:
        os.close(fd)
    return "\n".join(lines)


def explain_kill(pid: int, log: str | None = None) -> str | None:
    """Why seccomp killed ``pid``, from the kernel's audit line (None if not logged)."""
    for m in _AUDIT.finditer(kernel_log() if log is None else log):
        if int(m.group(1)) == pid and m.group(3) != "0":
            return (f"seccomp killed the VMM: thread {m.group(2)!r} called "
                    f"{syscall_name(int(m.group(4)))}, which its allowlist does not contain")
    return None
