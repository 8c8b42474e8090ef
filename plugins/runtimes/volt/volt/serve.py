"""``volt serve``: a pre-started, pre-imported VMM that forks one child per VM.

A fresh Python process spends most of its start-up importing (and, under nested
emulation, seconds of it). This server imports everything a VM needs once, then
listens on a unix socket (mode 0600: whoever may connect may run VMs as this
user). A client sends one request, a JSON object ``{"argv": [...]}`` holding the
arguments of ``volt run`` with exactly three file descriptors attached (SCM_RIGHTS):
the VM's stdin, stdout and stderr. The server forks; the child makes those its
0, 1 and 2, restarts the setup clock, and runs the VM exactly as ``python -m
volt.vmm`` does: the same parsing, the same exit codes, and the same confinement
(Landlock and seccomp, applied by the child to itself after the build). The server
answers ``{"pid": N}`` at once and ``{"exit": CODE}`` when the child has ended.

``volt spawn SOCKET -- RUN-ARGS`` is that client: the VM's console is the
terminal, SIGINT/SIGTERM are forwarded to the child, and its exit code is the VM's.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from stellarium_core.errors import StellarError

#: A request is one small JSON object.
MAX_REQUEST = 64 * 1024
#: Seconds a client has to send its request once connected: requests are taken one at a
#: time, so a client that connects and says nothing must not hold up the others.
REQUEST_TIMEOUT = 5.0


class ServeError(StellarError):
    """The server cannot listen, or a request is malformed."""


def preload() -> None:
    """Import the VMM, the confinement libraries and every installed device plugin; build
    the VMM's argument parser."""
    from stellarium_core import plugins
    from volt.vmm import preload as ahead

    ahead.modules()
    importlib.import_module("volt.vmm.__main__").parser()
    for info in plugins.installed("device"):
        try:
            plugins._load_target(info.target)
        except Exception as exc:  # a broken plugin fails its own VMs, not the server
            print(f"volt serve: device plugin {info.name} does not load: {exc}",
                  file=sys.stderr)


def serve(path: str | os.PathLike[str]) -> int:
    """Accept requests on ``path`` until SIGTERM or SIGINT; each VM runs in a child."""
    path = Path(path)
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                path.unlink()                    # a stale socket of an earlier server
        listener.bind(str(path))
        listener.listen(16)
    except OSError as exc:
        listener.close()
        raise ServeError(f"volt serve: cannot listen on {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    stop = threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        listener.shutdown(socket.SHUT_RDWR)

    handlers = {sig: signal.signal(sig, stopping) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"volt serve: listening on {path}", flush=True)
    try:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                break                            # shut down by a signal
            try:
                _start_vm(conn, handlers)
            except (ServeError, OSError, ValueError) as exc:
                _answer(conn, {"error": str(exc)})
                conn.close()
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return 0


def _start_vm(conn: socket.socket, handlers: dict) -> None:
    conn.settimeout(REQUEST_TIMEOUT)
    try:
        msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
    except TimeoutError:
        raise ServeError(f"no request within {REQUEST_TIMEOUT:g} s of connecting") from None
    conn.settimeout(None)
    try:
        if len(fds) != 3:
            raise ServeError(f"a request carries 3 file descriptors (stdin, stdout, "
                             f"stderr), got {len(fds)}")
        request = json.loads(msg)
        argv = request.get("argv") if isinstance(request, dict) else None
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ServeError('a request is {"argv": [strings]}')
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(fds, argv, handlers)                # never returns
    finally:
        for fd in fds:
            os.close(fd)
    _answer(conn, {"pid": pid})
    threading.Thread(target=_reap, args=(conn, pid), name=f"reap-{pid}", daemon=True).start()


def _child(fds: list[int], argv: list[str], handlers: dict) -> None:
    """The forked VM: its client's stdio, a fresh setup clock, ``volt run``'s main."""
    code = 1
    try:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # nothing of the server's: not its listening socket, not other clients' connections
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        from volt.vmm import timing
        from volt.vmm.__main__ import main

        timing.restart()
        code = main(argv)
    except SystemExit as exc:                # argparse: usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    except BaseException as exc:  # noqa: BLE001 (a child must never return into the server)
        with contextlib.suppress(OSError):
            os.write(2, f"volt serve: the VM failed: {type(exc).__name__}: {exc}\n".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(conn: socket.socket, pid: int) -> None:
    _pid, status = os.waitpid(pid, 0)
    _answer(conn, {"exit": os.waitstatus_to_exitcode(status)})
    conn.close()


def _answer(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode() + b"\n")


def spawn(path: str | os.PathLike[str], argv: list[str]) -> int:
    """Run one VM through the server at ``path`` with this process's stdio; its exit code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError as exc:
        raise ServeError(f"volt spawn: no volt serve at {path}: {exc.strerror}") from None
    with conn, conn.makefile("rb") as replies:
        socket.send_fds(conn, [json.dumps({"argv": argv}).encode()], [0, 1, 2])
        first = json.loads(replies.readline() or b"{}")
        if "pid" not in first:
            raise ServeError(f"volt spawn: {first.get('error', 'the server went away')}")
        pid = first["pid"]

        def forward(sig: int, _frame: object) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        last = json.loads(replies.readline() or b"{}")
    if "exit" not in last:
        raise ServeError("volt spawn: the server went away before the VM ended")
    return int(last["exit"])
