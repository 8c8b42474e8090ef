"""Self-confinement of a built VMM: the process step and the per-thread step.

The VMM calls :func:`apply` after the build and before the first guest
instruction, while it is still single-threaded (Landlock domains, capabilities
and no_new_privs are per thread, and only threads created afterwards inherit
them). In order: import what would load lazily; no_new_privs; Landlock; drop
every capability; the process seccomp filter (``main``, the union of every
thread kind). Each thread then calls :meth:`Confinement.enter_thread` first,
which names it (so the kernel's kill log says which thread) and stacks its own
narrower filter. Asked-for confinement that cannot be had is an error;
``--landlock=best-effort`` turns a missing Landlock into a warning.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    from volt.jail.policy import Policy

LANDLOCK_MODES = ("on", "best-effort", "off")
SECCOMP_MODES = ("kill", "log", "off")
PR_SET_NAME, PR_SET_NO_NEW_PRIVS = 15, 38

#: Imported here because the VMM may need them only after confinement, when
#: Landlock no longer lets Python read its own library: exit-code and exception
#: paths, the thread excepthook's traceback, and codecs used for guest bytes.
PRELOAD = ("traceback", "linecache", "encodings.latin_1", "encodings.ascii",
           "encodings.utf_8", "volt.vmm.exitcodes")

_libc = ctypes.CDLL(None, use_errno=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--landlock`` and ``--seccomp`` for ``volt run`` (and the lean VMM entry)."""
    p.add_argument("--landlock", choices=LANDLOCK_MODES, default="on",
                   help="filesystem (and, from ABI 4, TCP) confinement after setup; "
                        "best-effort warns instead of failing where the kernel has none "
                        "(default: on)")
    p.add_argument("--seccomp", choices=SECCOMP_MODES, default="kill",
                   help="syscall allowlists per thread kind; a violation kills the VMM "
                        "and the kernel logs it (audit type=1326); log only logs, for "
                        "development (default: kill)")


@dataclass
class Confinement:
    """One process's confinement: modes, the built filters, what was enforced."""

    landlock: str = "on"
    seccomp: str = "kill"

    def __post_init__(self) -> None:
        self.filters: dict[str, Any] = {}
        self.report: list[str] = []

    def apply_process(self, policy: Policy) -> str:
        """Confine the (single-threaded) process; returns the one-line report.

        The mechanisms are imported here, not with this module: ``volt run`` parses
        its options with it, and an API socket should answer before they load.
        """
        from volt.jail import caps, seccomp

        if self.landlock == "off" and self.seccomp == "off":
            return "volt: warning: running UNCONFINED (--landlock=off --seccomp=off)"
        for name in PRELOAD:
            importlib.import_module(name)
        others = _other_threads()
        if others:
            raise VoltError(f"cannot confine: threads already running ({', '.join(others)}); "
                            "confinement must start single-threaded", exitcodes.CONFINE)
        if self.seccomp != "off":
            self.filters = seccomp.build_all(self.seccomp)       # before Landlock: dlopen
        _preload_unwinder()
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        self._landlock(policy)
        caps.drop_all()
        self.report.append("capabilities dropped")
        for tree in policy.write:
            bad = _unwritable(tree)
            if bad:
                raise VoltError(f"cannot confine: {bad} is not writable by uid {os.getuid()} "
                                f"without capabilities (owner uid {os.stat(bad).st_uid}); "
                                f"a writable store must belong to the VMM's uid",
                                exitcodes.CONFINE)
        if self.filters:
            self.filters["main"].load()
            counts = ", ".join(f"{k} {seccomp.rule_count(k)}" for k in seccomp.KINDS)
            self.report.append(f"seccomp {self.seccomp} (rules: {counts})")
        else:
            self.report.append("seccomp OFF")
        return "volt: confined: " + "; ".join(self.report)

    def _landlock(self, policy: Policy) -> None:
        from volt.jail import landlock

        if self.landlock == "off":
            self.report.append("landlock OFF")
            return
        try:
            enforced = landlock.restrict(policy)
        except landlock.LandlockError as exc:
            if self.landlock == "best-effort" and landlock.abi_version() == 0:
                self.report.append(f"landlock UNAVAILABLE ({exc.strerror})")
                print(f"volt: warning: running without Landlock: {exc.strerror}",
                      file=sys.stderr)
                return
            raise VoltError(f"--landlock={self.landlock}: {exc.strerror}",
                            exitcodes.CONFINE) from None
        self.report.append(enforced.describe())

    def enter_thread(self, kind: str) -> None:
        """First thing in a new thread: name it after its Python name, stack its filter.

        A thread that cannot be confined ends the process: it must not run unconfined,
        and the VM could not go on without it.
        """
        name = threading.current_thread().name
        _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
        if self.filters:
            try:
                self.filters[kind].load()
            except (OSError, KeyError) as exc:
                os.write(2, f"volt: error: cannot confine thread {name} ({kind}): "
                            f"{exc}\n".encode())
                os._exit(exitcodes.CONFINE)


def _preload_unwinder() -> None:
    """Load libgcc_s now: glibc opens it on a thread's first pthread_exit, which is how
    Python ends a daemon thread (vCPU, I/O, API) that wakes while the interpreter exits.
    Opened after confinement, that is an openat no thread may make: the VMM would die
    of SIGSYS (or abort under Landlock) instead of returning the guest's exit code."""
    try:
        ctypes.CDLL("libgcc_s.so.1")
    except OSError:
        pass          # a static or musl Python has no such library to load later either


def _other_threads() -> list[str]:
    """Threads besides the caller: Python's own list, and the kernel's when /proc is there."""
    names = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    try:
        native = len(os.listdir("/proc/self/task")) - 1
    except OSError:
        native = len(names)
    return names or ([f"{native} native"] if native else [])


def _unwritable(tree: str) -> str | None:
    """The first directory or file under ``tree`` this process may not write, if any."""
    for top, _dirs, files in os.walk(tree):
        for p in [top, *(os.path.join(top, f) for f in files)]:
            if not os.access(p, os.W_OK):
                return p
    return None


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise VoltError(f"cannot confine: {what}: {os.strerror(err)}", exitcodes.CONFINE)


def apply(conf: Confinement, cfg: Any, machine: Any) -> None:
    """Confine the process of the built ``machine`` (booting ``cfg``) and hook its threads."""
    from volt.jail.policy import Policy

    devices = [t.device for t in machine.devices.transports.values()]
    print(conf.apply_process(Policy.for_vm(cfg.kernel, cfg.initrd, devices)),
          file=sys.stderr, flush=True)
    machine.enter_thread = conf.enter_thread


def from_args(args: argparse.Namespace) -> Confinement:
    """The confinement ``--landlock``/``--seccomp`` ask for."""
    return Confinement(args.landlock, args.seccomp)
