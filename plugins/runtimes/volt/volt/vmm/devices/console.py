"""The serial console's ends on the host: where guest output goes, where input comes from."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from volt.vmm import exitcodes
from volt.vmm.devices.serial import Serial
from volt.vmm.exitcodes import VoltError


def open_sink(spec: str) -> Callable[[bytes], None]:
    """Where console output goes: stdout, a file, a unix socket, or nowhere."""
    if spec == "stdout":
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, OSError):      # stdout replaced (embedding, tests)
            return lambda b: print(b.decode(errors="replace"), end="", flush=True)
        return lambda b: _write_all(fd, b)
    if spec == "none":
        return lambda b: None
    kind, _, path = spec.partition(":")
    if kind == "file" and path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VoltError(f"serial file {path}: {exc.strerror}", exitcodes.DEVICE) from None
        return lambda b: _write_all(fd, b)
    if kind == "unix" and path:
        import socket  # only for this sink: not a cost of every start-up

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
        except OSError as exc:
            raise VoltError(f"serial socket {path}: {exc.strerror}", exitcodes.DEVICE) from None
        return lambda b: _send(s, b)
    raise VoltError(f"serial output {spec!r}: use stdout, none, file:PATH or unix:PATH",
                    exitcodes.DEVICE)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass          # a closed console must not kill the guest


def _send(s: Any, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass


def feed_console(fd: int, serial: Serial, stopped: threading.Event,
                 enter_thread: Callable[[str], None] = lambda kind: None) -> None:
    """Forward bytes read from ``fd`` (stdin) to the guest's serial port, in a thread
    that first calls ``enter_thread("io")`` (confinement)."""
    def pump() -> None:
        enter_thread("io")
        while not stopped.is_set():
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            while data and not stopped.is_set():
                data = data[serial.input(data):]
                if data:
                    time.sleep(0.01)     # the guest has not drained its FIFO yet
    threading.Thread(target=pump, name="console-in", daemon=True).start()
