"""The API socket: a unix-socket HTTP/1.1 server in one thread, on the standard library.

Why not ``http.server``: it reads each request with blocking calls, so one client
that stops mid-request stalls every other one unless each connection gets its own
thread, and the API thread's seccomp filter allows no thread creation. This server
multiplexes every connection in one ``selectors`` loop instead, with the incremental
parser of :mod:`volt.api.http`; per-connection buffers, a connection cap and an idle
timeout bound what a client can hold. Sockets are only read and written with
``MSG_DONTWAIT``, so accepted sockets need no ``fcntl``/``ioctl`` to become
non-blocking: the API thread's syscalls stay those of the seccomp ``api`` kind.

The same server runs first in the main thread, before the VM exists (the process is
still unconfined then: what it may touch depends on the VM being configured), and,
once the VM is built and the process confined, in its own thread, which names itself
and stacks the ``api`` filter (``enter_thread("api")``) before its first request.
Connections open at the handover stay open.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable

from volt.api.http import HttpError, Request, Response, continue_response, fault, parse
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError
from volt.vmm.signals import block_in_this_thread

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32
IDLE_SECONDS = 120.0
RECV_BYTES = 65536
MAX_PENDING_OUTPUT = 1 << 20
FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL

Handler = Callable[[Request], Response]
_WAKE = object()                 # selector tag of the eventfd stop() writes


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closing = False            # close once outbuf is sent
        self.continued = False          # "100 Continue" sent for the request in inbuf
        self.seen = time.monotonic()


class ApiServer:
    """Answers each request on ``listener`` (from :func:`bind`) with ``handler``."""

    def __init__(self, listener: socket.socket, handler: Handler) -> None:
        self.handler = handler
        self._listener = listener
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, _WAKE)
        self._conns: dict[int, _Conn] = {}
        self._stopping = False
        self.thread: threading.Thread | None = None

    def serve(self, until: Callable[[], bool], every: float = 1.0,
              idle: Callable[[], None] | None = None) -> None:
        """Answer requests until ``until()`` is true (checked after each event batch and
        at least every ``every`` seconds). ``idle`` runs once, the first time no request
        is waiting: work done ahead of the requests that would otherwise wait for it."""
        while not until() and not self._stopping:
            ready = self._sel.select(0 if idle else every)
            if not ready and idle:
                idle, run = None, idle
                run()
                continue
            for key, events in ready:
                if key.data is None:
                    self._accept()
                elif key.data is _WAKE:
                    os.eventfd_read(self._wake)
                else:
                    self._service(key.data, events)
                if until() or self._stopping:
                    break
            self._reap()

    def start_thread(self, enter_thread: Callable[[str], None],
                     stopped: threading.Event) -> threading.Thread:
        """Serve in a thread of its own, the VM's ``api`` thread, until ``stopped``."""
        def main() -> None:
            block_in_this_thread(kick=False)
            enter_thread("api")
            try:
                self.serve(stopped.is_set)
            except Exception:            # a bug here must not take the VM down with it
                log.exception("API server thread failed")
        self.thread = threading.Thread(target=main, name="api", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self, timeout: float = 5.0) -> None:
        """End the API thread and wait for it: a daemon thread still running when the
        interpreter exits is ended by pthread_exit, which a confined thread must not reach."""
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if self.thread is not None:
            self.thread.join(timeout)

    def close(self) -> None:
        for c in list(self._conns.values()):
            self._drop(c)
        self._sel.close()
        self._listener.close()
        os.close(self._wake)

    # -- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        c = _Conn(sock)
        if len(self._conns) >= MAX_CONNECTIONS:
            _send_now(c, Response(503, {"fault_message": f"too many API connections (at "
                                        f"most {MAX_CONNECTIONS})"}).encode(close=True))
            sock.close()
            return
        self._conns[sock.fileno()] = c
        self._sel.register(sock, selectors.EVENT_READ, c)

    def _service(self, c: _Conn, events: int) -> None:
        c.seen = time.monotonic()
        if events & selectors.EVENT_READ and not c.closing:
            self._receive(c)
        self._flush(c)

    def _receive(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(RECV_BYTES, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                            # the client closed (or half-closed) its end
            if c.inbuf:
                self._queue(c, fault("incomplete request: the client closed the connection "
                                     "in the middle of it"), close=True)
            c.closing = True
            return
        c.inbuf += data
        while c.inbuf and not c.closing:
            try:
                p = parse(c.inbuf)
            except HttpError as exc:
                c.inbuf.clear()
                self._queue(c, fault(str(exc)), close=True)
                return
            if p.request is None:
                if p.expects_continue and not c.continued:
                    c.outbuf += continue_response()
                    c.continued = True
                return
            del c.inbuf[:p.used]
            c.continued = False
            self._queue(c, self._answer(p.request), close=not p.request.keep_alive)

    def _answer(self, req: Request) -> Response:
        try:
            return self.handler(req)
        except Exception as exc:                 # the handler's bug, not the client's
            log.exception("API request %s %s failed", req.method, req.path)
            return fault(f"internal error: {type(exc).__name__}: {exc}")

    def _queue(self, c: _Conn, resp: Response, *, close: bool) -> None:
        c.outbuf += resp.encode(close=close)
        c.closing = c.closing or close

    def _flush(self, c: _Conn) -> None:
        while c.outbuf:
            try:
                n = c.sock.send(c.outbuf, FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:                      # the client went away: nothing to tell it
                self._drop(c)
                return
            del c.outbuf[:n]
        if not c.outbuf and c.closing:
            self._drop(c)
            return
        # Read more only while answers are being taken: a client that pipelines requests
        # without reading the answers stops being read, and a closing one is not read at all.
        reading = not c.closing and len(c.outbuf) < MAX_PENDING_OUTPUT
        want = (selectors.EVENT_READ if reading else 0) | \
            (selectors.EVENT_WRITE if c.outbuf else 0)
        if self._sel.get_key(c.sock).events != want:
            self._sel.modify(c.sock, want, c)

    def _drop(self, c: _Conn) -> None:
        self._conns.pop(c.sock.fileno(), None)
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def _reap(self) -> None:
        """Close connections idle for IDLE_SECONDS (a client cannot hold a slot forever)."""
        old = time.monotonic() - IDLE_SECONDS
        for c in [c for c in self._conns.values() if c.seen < old]:
            self._drop(c)


def _send_now(c: _Conn, data: bytes) -> None:
    try:
        c.sock.send(data, FLAGS)
    except OSError:
        pass


def bind(path: str) -> socket.socket:
    """A listening unix socket at ``path``, owner-only; a stale socket file (nobody
    listening) is replaced, anything else there is an error. Clients can connect from
    here on; their requests wait in the socket until the server runs."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise VoltError(f"--api-sock {path}: another process is serving on it",
                                exitcodes.USAGE)
            finally:
                probe.close()
        else:
            raise VoltError(f"--api-sock {path}: exists and is not a socket", exitcodes.USAGE)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise VoltError(f"--api-sock {path}: {exc.strerror or exc}", exitcodes.USAGE) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(MAX_CONNECTIONS)
    except OSError as exc:
        sock.close()
        raise VoltError(f"--api-sock {path}: {exc.strerror or exc}", exitcodes.USAGE) from None
    finally:
        os.umask(old)
    sock.setblocking(False)
    return sock
