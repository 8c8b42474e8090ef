"""A timer a device watches on the VMM's event loop (a timerfd), for rate limits and polling.

The fd is created with the device (before the VMM confines itself); arming it later is
one ``timerfd_settime``, from whichever thread decides (an API call, a queue kick).
Python below 3.13 has no ``os.timerfd_create``, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timespec(seconds: float) -> _Timespec:
    ns = max(0, round(seconds * 1e9))
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class Timer:
    """A non-blocking monotonic timerfd: ``arm`` once or periodically, ``ack`` when it fired."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_create: {os.strerror(err)}")
        self.fd = fd

    def arm(self, seconds: float, interval: float = 0.0) -> None:
        """Fire after ``seconds`` (at least 1 ns), then every ``interval`` s if nonzero;
        replaces any earlier arming."""
        spec = _Itimerspec(_timespec(interval), _timespec(max(seconds, 1e-9)))
        self._settime(spec)

    def disarm(self) -> None:
        self._settime(_Itimerspec(_timespec(0), _timespec(0)))

    def _settime(self, spec: _Itimerspec) -> None:
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def ack(self) -> int:
        """How many expirations happened since the last ack (0 on a spurious wake-up)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
