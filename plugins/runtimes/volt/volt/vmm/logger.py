"""Firecracker's logger (PUT /logger, a config file's ``logger``) on Python's logging.

Lines look like Firecracker's: ``TIMESTAMP [INSTANCE:THREAD(:LEVEL)(:FILE:LINE)] message``.
The output is opened when the logger is configured, before confinement, and written
with plain ``write`` calls afterwards, from whichever thread logs. Every ``logging``
logger of the VMM process reaches it (the API server, the event loop's callback
errors), filtered by ``level`` and ``module`` (a logger-name prefix, e.g. ``volt.api``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from volt.vmm.metrics import open_output

TRACE = 5
LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG, "trace": TRACE, "off": logging.CRITICAL + 10}
NAMES = {logging.ERROR: "ERROR", logging.WARNING: "WARN", logging.INFO: "INFO",
         logging.DEBUG: "DEBUG", TRACE: "TRACE"}


class _Format(logging.Formatter):
    def __init__(self, instance: str, show_level: bool, show_origin: bool) -> None:
        super().__init__()
        self.instance, self.show_level, self.show_origin = instance, show_level, show_origin

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        tag = f"{self.instance}:{record.threadName}"
        if self.show_level:
            tag += ":" + NAMES.get(record.levelno, record.levelname)
        if self.show_origin:
            tag += f":{record.pathname}:{record.lineno}"
        return f"{ts}.{int(record.msecs * 1e6):09d} [{tag}] {record.getMessage()}"


class _FdHandler(logging.Handler):
    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))
        except OSError:
            pass                    # a full pipe or vanished reader must not stop the VMM


_installed: _FdHandler | None = None


def configure(settings: Mapping[str, Any], instance: str) -> None:
    """Send the process's log to ``log_path`` (stderr without one), replacing any earlier
    configuration. ``settings`` is a checked Firecracker Logger object."""
    global _installed
    path = settings.get("log_path")
    handler = _FdHandler(open_output(path) if path else 2)
    handler.setFormatter(_Format(instance, bool(settings.get("show_level")),
                                 bool(settings.get("show_log_origin"))))
    if settings.get("module"):
        handler.addFilter(logging.Filter(settings["module"]))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        if _installed.fd != 2:
            os.close(_installed.fd)
    root.addHandler(handler)
    root.setLevel(LEVELS[str(settings.get("level", "Info")).lower()])
    _installed = handler
