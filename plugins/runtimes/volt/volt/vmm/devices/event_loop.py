"""The I/O thread's event loop: host fds with callbacks, in one epoll set.

Devices (through their transport) and the VMM add, change and remove fds at any time,
from any thread, also while the loop is polling: epoll_ctl is safe against a
concurrent epoll_wait, and the callback table is guarded by a lock. An fd removed
while its event was already fetched is skipped; a callback may still see one
spurious wake-up when a closed fd's number is reused, so fds are non-blocking.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from volt.vmm.signals import block_in_this_thread

log = logging.getLogger(__name__)

Callback = Callable[[int], None]
T = TypeVar("T")


class _Call:
    """A function to run in the I/O thread, and its outcome."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.done = fn, threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except Exception as exc:
            self.error = exc
        self.done.set()


class EventLoop:
    """An epoll set whose callbacks run in the I/O thread (:meth:`run`)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._calls: deque[_Call] = deque()

    def add(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        """Call ``callback(events)`` in the I/O thread whenever ``fd`` is ready.

        Raises ValueError if ``fd`` is already registered, OSError if epoll refuses it.
        """
        with self._lock:
            if fd in self._callbacks or fd == self._wake:
                raise ValueError(f"fd {fd} is already registered with the event loop")
            self._epoll.register(fd, events)
            self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        """Change which events ``fd`` is watched for (0: none, keep the registration)."""
        with self._lock:
            if fd not in self._callbacks:
                raise ValueError(f"fd {fd} is not registered with the event loop")
            self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``; its callback is not called afterwards."""
        with self._lock:
            if self._callbacks.pop(fd, None) is None:
                raise ValueError(f"fd {fd} is not registered with the event loop")
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass          # already closed by its owner: epoll dropped it itself

    def __contains__(self, fd: int) -> bool:
        with self._lock:
            return fd in self._callbacks

    def run(self) -> None:
        """The I/O thread. Per-thread confinement of the I/O thread starts here."""
        block_in_this_thread(kick=False)
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            self._dispatch(events)
        self._dispatch(self._epoll.poll(0))       # events that raced with the stop
        while self._calls:                        # nobody will run these any more
            c = self._calls.popleft()
            c.error = RuntimeError("the VM has stopped")
            c.done.set()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        for fd, ev in events:
            if fd == self._wake:
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                while self._calls:
                    self._calls.popleft().run()
                continue
            with self._lock:
                callback = self._callbacks.get(fd)
            if callback is None:
                continue
            try:
                callback(ev)
            except Exception:  # the loop outlives any one callback
                log.exception("event loop: callback for fd %d failed; fd removed", fd)
                try:
                    self.remove(fd)
                except ValueError:
                    pass

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` in the I/O thread, where the devices live, and return what it returns
        (or raise what it raised). For other threads that must touch device state.
        Raises TimeoutError if the I/O thread does not get to it in ``timeout`` seconds,
        RuntimeError once the loop has stopped."""
        c = _Call(fn)
        if self._stopping:
            raise RuntimeError("the VM has stopped")
        self._calls.append(c)
        os.eventfd_write(self._wake, 1)
        if not c.done.wait(timeout):
            raise TimeoutError(f"the I/O thread did not answer within {timeout:g} s")
        if c.error is not None:
            raise c.error
        return c.value

    def stop(self) -> None:
        """Make :meth:`run` return after the events at hand (any thread)."""
        self._stopping = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass          # closed: nothing runs any more

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake)
