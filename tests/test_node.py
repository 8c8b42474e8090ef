"""A node's HTTP server (``stellar node serve``): chunks by hash for peers, the CDN
layout for pulls, and a pull from a peer that moves only the chunks the puller lacks."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.net import free_port
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.host import Host
from tests.helpers import run_cli

HASHER = Blake3Hasher({})


def node_config(root: Path, port: int, peers: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "host.toml"
    table = ", ".join(f'{k} = "{v}"' for k, v in (peers or {}).items())
    cfg.write_text(f'[store]\npath = "store"\n[cluster]\nnode = "{root.name}"\n'
                   f'listen = "127.0.0.1:{port}"\npeers = {{ {table} }}\n')
    assert run_cli(["--config", cfg, "host", "init"]).returncode == 0
    return cfg


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A node holding image 'img' (30 files), serving on loopback."""
    port = free_port()
    cfg = node_config(tmp_path / "p", port)
    src = tmp_path / "v1"
    src.mkdir()
    rng = random.Random(1)
    for i in range(30):
        (src / f"f{i}").write_bytes(rng.randbytes(rng.randrange(10_000, 120_000)))
    assert run_cli(["--config", cfg, "image", "import", src, "img"]).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "stellarium_core", "--config", str(cfg),
                             "node", "serve"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and "serving" in proc.stdout.readline()
    try:
        yield cfg, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_node_serves_chunks_manifests_and_tags_and_nothing_else(
        served: tuple[Path, str]) -> None:
    cfg, url = served
    host = Host.from_config(cfg)
    digest = host.store.digests()[0]
    status, body = get(f"{url}/chunks/{digest.hex()}")
    assert status == 200 and HASHER.digest(body) == digest
    status, tag = get(f"{url}/tags/img")
    assert status == 200
    status, manifest = get(f"{url}/manifests/{tag.decode().strip()}.json")
    assert status == 200 and HASHER.digest(manifest).hex() == tag.decode().strip()
    for bad in ("/chunks/" + "ab" * 32, "/tags/nope", "/tags/..%2f..%2fetc", "/../../etc/passwd",
                "/manifests/" + "00" * 32 + ".json", "/chunks/xyz", "/"):
        assert get(url + bad)[0] == 404, bad


def test_pull_from_a_peer_fetches_only_the_missing_chunks(
        served: tuple[Path, str], tmp_path: Path) -> None:
    cfg, url = served
    puller = node_config(tmp_path / "q", free_port())
    # the puller already has an older version: most files are the same
    old = tmp_path / "v0"
    old.mkdir()
    for f in sorted((tmp_path / "v1").iterdir())[:24]:
        (old / f.name).write_bytes(f.read_bytes())
    assert run_cli(["--config", puller, "image", "import", old, "old"]).returncode == 0
    have = Host.from_config(puller).store
    src = Host.from_config(cfg).store  # every chunk there is the image's
    wanted = {d: src.size(d) for d in src.digests()}
    missing = {d: n for d, n in wanted.items() if not have.contains(d)}
    assert 0 < len(missing) < len(wanted) / 2
    _, before = get(f"{url}/stats")
    res = json.loads(run_cli(["--config", puller, "pull", f"{url}/tags/img", "img",
                              "--json"]).stdout)
    _, after = get(f"{url}/stats")
    sent = {k: json.loads(after)[k] - json.loads(before)[k]
            for k in ("chunks_sent", "bytes_sent")}
    assert res["blobs_fetched"] == sent["chunks_sent"] == len(missing)
    blob_bytes = sum(missing.values())
    assert blob_bytes <= sent["bytes_sent"] < blob_bytes + 64 * 1024  # + manifests, tag
    assert sent["bytes_sent"] < sum(wanted.values()) / 2
    assert run_cli(["--config", puller, "fsck"]).returncode == 0
