"""nginx serving a static directory on loopback, as a CDN stand-in.

Tests and the pull benchmark both need a real HTTP server with ``gzip_static``;
this keeps one config. With ``log_bytes`` the access log holds one line per
request with the body bytes sent, so the wire bytes are counted by the server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType

from devtools.net import free_port, wait_listening


def nginx_binary() -> str | None:
    """The nginx executable (often in /usr/sbin, which may not be on PATH), or None."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if os.path.exists(found) else None


class Nginx:
    """nginx (one worker, ``gzip_static on``) serving ``site``; files go under ``work``."""

    def __init__(self, site: Path, work: Path, *, log_bytes: bool = False) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = work / "access.log"
        access = f"log_format bytes '$body_bytes_sent';\n  access_log {self.log} bytes;" \
            if log_bytes else "access_log off;"
        conf = work / "nginx.conf"
        conf.write_text(f"""
user root root;  # trees under root-only tmp dirs must be readable
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 256; }}
http {{
  {access}
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  keepalive_requests 100000;
  gzip_static on;
  server {{ listen 127.0.0.1:{self.port}; root {site}; }}
}}
""")
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-g", "daemon off;"])
        try:
            wait_listening(self.port, self.proc)
        except RuntimeError as exc:
            self.stop()
            errors = (work / "error.log").read_text(errors="replace")[-800:] \
                if (work / "error.log").exists() else ""
            raise RuntimeError(f"{exc}\n{errors}") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def mark(self) -> int:
        """Where the access log ends now (see :meth:`since`)."""
        return self.log.stat().st_size if self.log.exists() else 0

    def since(self, mark: int) -> tuple[int, int]:
        """(requests, body bytes) logged after ``mark`` (needs ``log_bytes``)."""
        with open(self.log, "rb") as fh:
            fh.seek(mark)
            lines = fh.read().split()
        return len(lines), sum(int(x) for x in lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
