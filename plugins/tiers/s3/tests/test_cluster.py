"""Several nodes, one SeaweedFS cluster: every node its own store and processes, all on
loopback. The cluster is real: a master with replication on, two volume servers, a
filer and the S3 gateway, each its own ``weed`` process."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from devtools.net import free_port
from devtools.seaweedfs import SeaweedCluster
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.photon.peers import PeerTier
from tests.helpers import run_cli

HASHER = Blake3Hasher({})


class Node:
    """One node: a store, a host config on the shared cluster, a `stellar node serve`."""

    def __init__(self, root: Path, name: str, cold: dict[str, Any] | None,
                 peers: dict[str, str], port: int, durability: str = "remote") -> None:
        self.root, self.name, self.port = root, name, port
        root.mkdir(parents=True, exist_ok=True)
        self.cfg = root / "host.toml"
        lines = ['[store]', 'path = "store"', f'durability = "{durability}"']
        if cold is not None:
            lines += ["[tiers.cold]", 'plugin = "s3"', f"params = {_toml(cold)}"]
        lines += ["[cluster]", f'node = "{name}"', f'listen = "127.0.0.1:{port}"',
                  f"peers = {_toml(peers)}"]
        self.cfg.write_text("\n".join(lines) + "\n")
        self.server: subprocess.Popen[str] | None = None
        assert self.cli("host", "init").returncode == 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_cli(["--config", self.cfg, *args], timeout=timeout)

    def json(self, *args: object) -> Any:
        r = self.cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def cat(self, digest: str) -> bytes:
        """The chunk's bytes as this node's ``stellar cat`` prints them (checked here too)."""
        r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(self.cfg),
                            "cat", digest], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert HASHER.digest(r.stdout).hex() == digest
        self.last_stderr = r.stderr
        return r.stdout

    def tiers(self) -> dict[str, dict[str, Any]]:
        return {t["level"]: t for t in self.json("tiers")["tiers"]}

    def serve(self) -> None:
        self.server = subprocess.Popen(
            [sys.executable, "-m", "stellarium_core", "--config", str(self.cfg), "node",
             "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        line = self.server.stdout.readline()
        assert line.startswith(f"node {self.name} serving"), self.server.stderr.read()

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(30)


def _toml(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


@pytest.fixture
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Node]]:
    """Three nodes, a b c, sharing one bucket of the test's cluster as their cold tier."""
    cluster = request.getfixturevalue("own_cluster" if "own_cluster" in request.fixturenames
                                      else "cluster")
    cold = cluster.tier_params(bucket=f"chunks-{request.node.name[:40].lower()}".replace("_", "-"))
    request.node.bucket = cold["bucket"]
    ports = {n: free_port() for n in "abc"}
    out = {n: Node(tmp_path / n, n, cold, {p: f"http://127.0.0.1:{ports[p]}"
                                          for p in ports if p != n}, ports[n])
           for n in ports}
    try:
        yield out
    finally:
        for node in out.values():
            node.stop()


def tree(root: Path, seed: int, files: int = 12) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.bin").write_bytes(rng.randbytes(rng.randrange(20_000, 150_000)))
    return root


def chunk_list(node: Node, manifest: str) -> list[tuple[str, int]]:
    doc = json.loads(node.cli("cat", manifest).stdout)
    return [(d, n) for e in doc["entries"] for d, n in e.get("chunks", [])]


def in_s3(cluster: SeaweedCluster, bucket: str, digest: str) -> bytes:
    obj = cluster.client().get_object(Bucket=bucket,
                                      Key=f"stellarium/chunks/{digest[:2]}/{digest}")
    return obj["Body"].read()


@pytest.mark.slow
def test_three_nodes_share_chunks_through_the_cluster_and_each_other(
        own_cluster: SeaweedCluster, nodes: dict[str, Node], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    cluster = own_cluster
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    manifest = a.json("ingest", tree(tmp_path / "data", 1))["manifest"]
    chunks = chunk_list(a, manifest)
    assert len(chunks) > 10
    for d, n in chunks:  # remote durability: every chunk was in S3 when ingest returned
        body = in_s3(cluster, request.node.bucket, d)
        assert len(body) == n and HASHER.digest(body).hex() == d

    # b lacks them all and no peer serves yet: the cluster has them
    b.cat(chunks[0][0])
    assert b.tiers()["cold"]["hits"] == 1

    # with a serving, c gets a chunk from a peer (ring order, both peers asked), not S3
    a.serve()
    b.serve()
    c.cat(chunks[1][0])
    ct = c.tiers()
    assert ct["peers"]["hits"] == 1 and ct["cold"]["hits"] == 0, ct

    # replication is on: with one volume server down every chunk still reads back
    cluster.volume_processes[0].stop()
    a.stop()
    b.stop()
    for d, _n in chunks[2:6]:
        c.cat(d)
    assert c.tiers()["cold"]["hits"] == 4


KILLED_WRITER = textwrap.dedent("""
    import random, sys
    from stellarium_core.host import Host
    from stellarium_core.volumes.volume import VolumeStore

    host = Host.from_config(sys.argv[1])
    vols = VolumeStore.for_host(host)
    rng = random.Random(7)
    with vols.create("v", 64 << 20) as vol:
        for i in range(1000):
            data = rng.randbytes(65536)
            vol.write(i * 65536, data)
            vol.flush()  # the write is acknowledged here
            print("ACK", host.hasher.digest(data).hex(), flush=True)
""")


@pytest.mark.slow
def test_a_node_killed_mid_write_loses_no_acknowledged_chunk(
        cluster: SeaweedCluster, nodes: dict[str, Node]) -> None:
    a, b = nodes["a"], nodes["b"]
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(a.cfg)],
                            stdout=subprocess.PIPE, text=True)
    acked = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while len(acked) < 25 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ACK "):
            acked.append(line.split()[1])
    proc.send_signal(signal.SIGKILL)  # mid-write, no warning
    proc.wait(30)
    acked += [ln.split()[1] for ln in proc.stdout.read().splitlines() if ln.startswith("ACK ")]
    assert len(acked) >= 25
    shutil.rmtree(a.root / "store")  # and its disk is gone for good
    for d in acked:  # another node reads every acknowledged chunk from the cluster
        b.cat(d)


class _Liar(BaseHTTPRequestHandler):
    """A peer that answers every chunk request with bytes that are not the chunk."""

    asked: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).asked.append(self.path)
        body = b"not the chunk you asked for" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_a_peer_serving_wrong_bytes_is_caught_and_skipped(
        cluster: SeaweedCluster, nodes: dict[str, Node], tmp_path: Path) -> None:
    a = nodes["a"]
    liar = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    try:
        manifest = a.json("ingest", tree(tmp_path / "data", 2))["manifest"]
        a.serve()
        peers = {"evil": f"http://127.0.0.1:{liar.server_port}", "a": a.url}
        d = Node(tmp_path / "d", "d", None, peers, free_port(), durability="local")
        ring = PeerTier("d", peers, HASHER)
        victim = next(h for h, _n in chunk_list(a, manifest)
                      if ring.order(bytes.fromhex(h))[0] == "evil")  # the liar is asked first
        d.cat(victim)
        assert f"/chunks/{victim}" in _Liar.asked
        assert b"do not hash to it; skipped" in d.last_stderr  # said, not silent
        peers_row = d.tiers()["peers"]
        assert peers_row["hits"] == 1 and peers_row["corrupt"] == 1
        fsck = d.cli("fsck")
        assert fsck.returncode == 0, fsck.stdout  # only the good copy was stored
    finally:
        liar.shutdown()


@pytest.mark.slow
def test_seaweedfs_down_refuses_remote_writes_clearly_and_loses_nothing(
        own_cluster: SeaweedCluster, nodes: dict[str, Node], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    cluster = own_cluster
    a, b = nodes["a"], nodes["b"]
    before = a.json("ingest", tree(tmp_path / "before", 3, files=3))["manifest"]
    acked = chunk_list(a, before)
    cluster.stop()  # every weed process: master, volume servers, filer, S3 gateway
    data = tree(tmp_path / "during", 4, files=2)
    r = a.cli("ingest", data, timeout=600)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "not acknowledged" in r.stderr and "could not be stored in the cold tier" in r.stderr
    assert a.cli("fsck").returncode == 0  # the local store is whole
    cluster.start()
    r = a.cli("ingest", data)
    assert r.returncode == 0, r.stderr  # the same write, once S3 is back
    for d, _n in acked + chunk_list(a, r.stdout.strip()):
        body = in_s3(cluster, request.node.bucket, d)
        assert HASHER.digest(body).hex() == d  # nothing acknowledged was lost
    b.cat(acked[0][0])


@pytest.mark.slow
def test_a_pull_takes_what_the_cluster_has_from_the_cluster(
        cluster: SeaweedCluster, nodes: dict[str, Node], tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    a = nodes["a"]
    assert a.cli("image", "import", tree(tmp_path / "img", 5), "img").returncode == 0
    a.serve()
    # a node on the cluster that knows no peers: the pull URL is a's, the chunks are S3's
    d = Node(tmp_path / "d", "d", cluster.tier_params(bucket=request.node.bucket), {},
             free_port(), durability="local")
    res = d.json("pull", f"{a.url}/tags/img", "img")
    assert res["blobs_fetched"] > 0 and res["blobs_from_tiers"] == res["blobs_fetched"]
    with urllib.request.urlopen(f"{a.url}/stats", timeout=10) as resp:
        stats = json.loads(resp.read())
    assert stats["chunks_sent"] == 0  # manifests and the tag from the peer, no chunk
    assert d.cli("fsck").returncode == 0
