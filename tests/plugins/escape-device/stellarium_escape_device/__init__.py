"""A hostile device plugin, for tests only: from inside the VMM it tries one escape.

``--device escape-device,attempt=NAME[,thread=vcpu|io][,port=P][,pid=N][,path=P]``.
The attempt runs in the thread that serves the device: the vCPU thread on the
guest's first config-space read (``thread=vcpu``), or the I/O thread on its first
queue notification (``thread=io``). It reports on stderr, one line:
``escape-device: NAME in THREAD: blocked: errno N (ENAME)`` or ``... SUCCEEDED``;
a seccomp kill leaves no line (the process is gone). Config space reads 1 once the
attempt is over, which is what the test guest waits for before it resets.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from stellarium_core.config import Field, one_of, validate_params
from stellarium_core.hookspecs import hookimpl
from stellarium_core.virtio import VIRTIO_F_VERSION_1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PTRACE_ATTACH = 16
SYS_INIT_MODULE = 175


def _c(ret: int) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _read_shadow(p: dict[str, Any]) -> None:
    with open("/etc/shadow", "rb") as fh:
        fh.read(1)


def _exec_sh(p: dict[str, Any]) -> None:
    os.execv("/bin/sh", ["sh", "-c", "exit 0"])


def _connect_tcp(p: dict[str, Any]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect(("127.0.0.1", int(p["port"])))
    finally:
        s.close()


def _ptrace_sibling(p: dict[str, Any]) -> None:
    _c(_libc.ptrace(PTRACE_ATTACH, int(p["pid"]), None, None))


def _signal_sibling(p: dict[str, Any]) -> None:
    os.kill(int(p["pid"]), signal.SIGCONT)


def _write_outside(p: dict[str, Any]) -> None:
    with open(p["path"], "wb") as fh:
        fh.write(b"escaped")


def _open_dev_mem(p: dict[str, Any]) -> None:
    with open(p["path"] or "/dev/mem", "rb") as fh:
        fh.read(1)


def _load_module(p: dict[str, Any]) -> None:
    image = b"\x7fELF" + bytes(60)                 # init_module parses only after the checks
    _c(_libc.syscall(SYS_INIT_MODULE, image, len(image), b""))


def _mount(p: dict[str, Any]) -> None:
    _c(_libc.mount(b"none", p["path"].encode(), b"tmpfs", 0, None))


ATTEMPTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "read-shadow": _read_shadow, "exec-sh": _exec_sh, "connect-tcp": _connect_tcp,
    "ptrace-sibling": _ptrace_sibling, "signal-sibling": _signal_sibling,
    "write-outside": _write_outside,
    "open-dev-mem": _open_dev_mem, "load-module": _load_module, "mount": _mount,
}


class EscapeDevice:
    """A virtio device (id 42, one queue) whose only work is the escape attempt."""

    device_id = 42
    features = VIRTIO_F_VERSION_1
    queue_sizes = (8,)

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.done = False

    def _attempt(self) -> None:
        name = self.params["attempt"]
        where = threading.current_thread().name
        try:
            ATTEMPTS[name](self.params)
            line = f"escape-device: {name} in {where}: SUCCEEDED\n"
        except OSError as exc:
            line = (f"escape-device: {name} in {where}: blocked: errno {exc.errno} "
                    f"({errno.errorcode.get(exc.errno, '?')})\n")
        os.write(2, line.encode())
        self.done = True

    def read_config(self, offset: int, size: int) -> bytes:
        if self.params["thread"] == "vcpu" and not self.done:
            self._attempt()
        return struct.pack("<I", int(self.done)).ljust(size, b"\0")[:size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(self, features: int, mem: Any, queues: list[Any],
                 interrupt: Callable[[], None]) -> None:
        pass

    def notify(self, queue: int) -> None:
        if self.params["thread"] == "io" and not self.done:
            self._attempt()

    def reset(self) -> None:
        pass


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> EscapeDevice | None:
    if name != "escape-device":
        return None
    return EscapeDevice(validate_params(params, {
        "attempt": Field(str, check=one_of(*ATTEMPTS), doc="which escape to try"),
        "thread": Field(str, "vcpu", check=one_of("vcpu", "io"),
                        doc="vcpu (config read) or io (queue notify)"),
        "port": Field(str, "0", doc="connect-tcp: a listening loopback port"),
        "pid": Field(str, "0", doc="ptrace-/signal-sibling: the target process"),
        "path": Field(str, "", doc="write-outside / mount / open-dev-mem (a copy of the "
                                     "node where the host has none): the target path"),
    }))
