"""Images, the CDN layout and pulls over real HTTP on loopback, incl. hostile servers."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.nginx import Nginx, nginx_binary
from stellarium_core.distribution import (
    FetchError,
    FetchPolicy,
    ImageError,
    ImageStore,
    Importer,
    Puller,
    parse_url,
    publish,
    shared_chunks,
)
from stellarium_core.errors import UsageError
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.nebula import ChunkStore
from stellarium_core.volumes import filetree

# Generous timeouts: the machine is shared and loaded; only the stall test is tight.
FAST = FetchPolicy(timeout=15, attempts=2, backoff=0.0)
STALL = FetchPolicy(timeout=1.0, attempts=2, backoff=0.0)


def open_images(root: Path, hasher: Blake3Hasher) -> ImageStore:
    store = ChunkStore.open(root / "nebula", hasher, create=True)
    return ImageStore(root / "images", store, hasher)


@pytest.fixture
def src(hasher, tmp_path: Path) -> ImageStore:
    images = open_images(tmp_path / "src", hasher)
    yield images
    images.store.close()


@pytest.fixture
def dst(hasher, tmp_path: Path) -> ImageStore:
    images = open_images(tmp_path / "dst", hasher)
    yield images
    images.store.close()


def make_tree(root: Path, seed: int = 1) -> Path:
    """Big random files (several FastCDC chunks), a big text, small packed files, links."""
    import random

    rnd = random.Random(seed)
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc/debian_version").write_text("12.99\n")
    for i in range(20):
        (root / "etc" / f"small{i}.conf").write_bytes(rnd.randbytes(100 + 37 * i))
    for i in range(3):
        (root / "usr/lib" / f"big{i}.so").write_bytes(rnd.randbytes(300_000 + i * 5000))
    words = [rnd.choice(("stellar", "nebula", "chunk", "layer", "pull")) for _ in range(40_000)]
    (root / "usr/lib/README").write_text(" ".join(words))  # compressible, for gzip
    os.symlink("/usr/lib/big0.so", root / "usr/lib/link.so")
    os.link(root / "usr/lib/big1.so", root / "usr/lib/hard.so")
    os.chmod(root / "usr/lib/big2.so", 0o4755)
    return root


class CDNHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the CDN dir; ``server.mode`` makes it hostile for blob GETs."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.gets.append(self.path)
            n_blob = sum(1 for p in srv.gets if "/blobs/" in p)
        mode = srv.mode
        if mode == "count" and "/blobs/" in self.path:
            with srv.lock:
                srv.active += 1
                srv.peak = max(srv.peak, srv.active)
            time.sleep(0.05)
            try:
                return super().do_GET()
            finally:
                with srv.lock:
                    srv.active -= 1
        if "/blobs/" not in self.path and not (mode == "bad-manifest" and
                                               "/manifests/" in self.path):
            return super().do_GET()
        if mode == "ok" or (mode == "fail-after" and n_blob <= srv.limit):
            return super().do_GET()
        path = Path(self.translate_path(self.path))
        body = path.read_bytes() if path.exists() else b""
        if mode in ("404", "fail-after"):
            self.send_error(404)
        elif mode == "bad-gzip":
            junk = b"\x1f\x8b\x08\x00" + b"not really deflate" * 10
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(junk)))
            self.end_headers()
            self.wfile.write(junk)
        elif mode in ("corrupt", "bad-manifest"):
            bad = bytearray(body)
            bad[len(bad) // 2] ^= 0xFF
            self._send(bytes(bad))
        elif mode == "truncate":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif mode == "bad-length":
            self.send_response(200)
            self.send_header("Content-Length", "lots")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
        elif mode == "stall":
            time.sleep(5)
        elif mode == "flaky-503":
            with srv.lock:
                first = self.path not in srv.failed
                srv.failed.add(self.path)
            if first:
                self.send_error(503)
            else:
                super().do_GET()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[http.server.ThreadingHTTPServer]:
    root = tmp_path / "cdn"
    root.mkdir()

    def handler(*a, **kw):
        return CDNHandler(*a, directory=str(root), **kw)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    srv.handle_error = lambda *a: None  # hostile modes drop connections on purpose
    srv.root, srv.mode, srv.limit, srv.active, srv.peak = root, "ok", 0, 0, 0
    srv.lock, srv.gets, srv.failed = threading.Lock(), [], set()
    srv.url = f"http://127.0.0.1:{srv.server_port}/"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def assert_clean(images: ImageStore) -> None:
    """A failed pull left no name, no manifest, and only verified chunks."""
    assert images.index() == {}
    assert list(images.manifests.glob("*.json")) == []
    assert images.store.fsck().ok


def imported(src: ImageStore, chunker, hasher, tree: Path, name: str = "app") -> bytes:
    return Importer(src, chunker, hasher).import_path(tree, name)


def test_publish_pull_roundtrip_restores_identical_tree(src, dst, chunker, hasher, server,
                                                        tmp_path):
    tree = make_tree(tmp_path / "tree")
    digest = imported(src, chunker, hasher, tree)
    pub = publish(src, "app", server.root)
    assert pub.blobs_written > 10 and (server.root / pub.tag).read_text().strip() == digest.hex()
    assert publish(src, "app", server.root).blobs_written == 0  # idempotent, incremental

    base, tag, pinned = parse_url(server.url + "tags/app")
    res = Puller(dst, base, policy=FAST).pull("copy", tag=tag, digest=pinned)
    assert res.digest == digest and res.blobs_fetched == res.blobs_needed == pub.blobs_written
    out = tmp_path / "out"
    filetree.restore(dst.flatten("copy"), dst.store, out, hasher)
    assert filetree.diff_trees(tree, out) == []

    # Pulling again fetches nothing; a pinned manifest URL works too.
    server.gets.clear()
    base, _, pinned = parse_url(server.url + f"manifests/{digest.hex()}.json")
    again = Puller(dst, base, policy=FAST).pull("copy2", digest=pinned)
    assert again.blobs_fetched == 0 and not [p for p in server.gets if "/blobs/" in p]

    # References: removing both names and collecting leaves an empty store.
    dst.remove("copy")
    assert dst.store.stats()["chunks"] > 0
    dst.remove("copy2")
    dst.store.gc()
    assert dst.store.stats()["chunks"] == 0 and list(dst.manifests.glob("*")) == []


def test_sibling_pull_fetches_only_the_chunks_that_differ(src, dst, chunker, hasher, server,
                                                          tmp_path):
    a = make_tree(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=True)
    (b / "usr/lib/extra.so").write_bytes(os.urandom(200_000))
    imported(src, chunker, hasher, a, "a")
    imported(src, chunker, hasher, b, "b")
    publish(src, "a", server.root, gzip=True)  # .gz siblings: ignored by a plain server
    publish(src, "b", server.root, gzip=True)
    first = Puller(dst, server.url, policy=FAST).pull("a", tag="a")
    second = Puller(dst, server.url, policy=FAST).pull("b", tag="b")
    b_refs = set().union(*(set(e.chunks) for e in dst.flatten("b")))
    new_big = {d for d, _ in b_refs} - {d for e in dst.flatten("a") for d, _ in e.chunks}
    # Only the new file's chunks and the re-cut Cosmic Packs travel.
    assert second.blobs_fetched < first.blobs_fetched
    assert second.blobs_fetched >= len(new_big) > 0
    assert second.bytes_fetched < 0.6 * first.bytes_fetched
    assert {r["name"]: r["shared_chunks"] for r in dst.listing()}["b"] > 0


def test_listing_and_totals_decode_each_layer_once(src, chunker, hasher, tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    imported(src, chunker, hasher, tree, "one")
    imported(src, chunker, hasher, tree, "two")  # the same layer under a second name
    decoded: list[bytes] = []
    real = ImageStore.layer
    monkeypatch.setattr(ImageStore, "layer", lambda self, d: decoded.append(d) or real(self, d))
    rows = src.listing()
    totals = shared_chunks(src)
    assert len(decoded) == len(set(decoded)) == 1
    assert [r["shared_chunks"] for r in rows] == [r["chunks"] for r in rows]
    assert totals["image_chunks"] == totals["chunks_shared_between_images"] == rows[0]["chunks"]


def test_unparsable_content_length_reads_to_close_and_verifies(src, dst, chunker, hasher,
                                                               server, tmp_path):
    tree = make_tree(tmp_path / "tree")
    imported(src, chunker, hasher, tree)
    publish(src, "app", server.root)
    server.mode = "bad-length"
    res = Puller(dst, server.url, workers=2, policy=FAST).pull("app", tag="app")
    assert res.blobs_fetched > 0
    out = tmp_path / "out"
    filetree.restore(dst.flatten("app"), dst.store, out, hasher)
    assert filetree.diff_trees(tree, out) == []


@pytest.mark.parametrize("mode, message", [
    ("corrupt", "content does not match its hash"),
    ("404", "HTTP 404"),
    ("truncate", "truncated body"),
    ("stall", "timed out"),
    ("bad-gzip", "corrupt gzip body"),
])
def test_hostile_server_gives_clear_error_and_clean_store(src, dst, chunker, hasher, server,
                                                          tmp_path, mode, message):
    imported(src, chunker, hasher, make_tree(tmp_path / "tree"))
    publish(src, "app", server.root)
    server.mode = mode
    with pytest.raises(FetchError, match=message) as info:
        Puller(dst, server.url, workers=2, policy=STALL if mode == "stall" else FAST).pull(
            "app", tag="app")
    # A 404 is final; everything else was retried before giving up.
    assert "/blobs/" in str(info.value)
    assert ("gave up after 2 attempts" in str(info.value)) == (mode != "404")
    assert_clean(dst)


def test_oversized_blob_is_refused_without_reading_it(src, dst, chunker, hasher, server,
                                                      tmp_path, monkeypatch):
    from stellarium_core.distribution import pull

    imported(src, chunker, hasher, make_tree(tmp_path / "tree"))
    publish(src, "app", server.root)
    monkeypatch.setattr(pull, "MAX_BLOB", 1000)
    with pytest.raises(FetchError, match="exceeds the 1000-byte limit"):
        Puller(dst, server.url, policy=FAST).pull("app", tag="app")
    assert_clean(dst)


def test_tampered_manifest_is_refused(src, dst, chunker, hasher, server, tmp_path):
    imported(src, chunker, hasher, make_tree(tmp_path / "tree"))
    publish(src, "app", server.root)
    server.mode = "bad-manifest"
    with pytest.raises(FetchError, match="manifests/.*does not match its hash"):
        Puller(dst, server.url, policy=FAST).pull("app", tag="app")
    assert_clean(dst)
    assert dst.store.stats()["chunks"] == 0


def test_interrupted_pull_resumes_without_refetching(src, dst, chunker, hasher, server,
                                                     tmp_path):
    tree = make_tree(tmp_path / "tree")
    imported(src, chunker, hasher, tree)
    pub = publish(src, "app", server.root)
    server.mode, server.limit = "fail-after", 5
    with pytest.raises(FetchError):
        Puller(dst, server.url, workers=1, policy=FAST).pull("app", tag="app")
    assert dst.index() == {}
    stored_before = set(dst.store.digests())
    kept = len(stored_before)
    assert kept == 5  # verified blobs stay, journaled, for the next attempt

    server.mode = "ok"
    server.gets.clear()
    res = Puller(dst, server.url, policy=FAST).pull("app", tag="app")
    assert res.blobs_resumed == kept and res.blobs_fetched == pub.blobs_written - kept
    asked = {p.rsplit("/", 1)[1] for p in server.gets if "/blobs/" in p}
    assert len(asked) == pub.blobs_written - kept  # (a retried GET may repeat one)
    assert not asked & {d.hex() for d in stored_before}
    assert list(dst.pulls.glob("*.json")) == []  # the journal is gone
    out = tmp_path / "out"
    filetree.restore(dst.flatten("app"), dst.store, out, hasher)
    assert filetree.diff_trees(tree, out) == []
    dst.remove("app")  # the journal's extra references were given back
    dst.store.gc()
    assert dst.store.stats()["chunks"] == 0


def test_transient_503_is_retried(src, dst, chunker, hasher, server, tmp_path):
    imported(src, chunker, hasher, make_tree(tmp_path / "tree"))
    publish(src, "app", server.root)
    server.mode = "flaky-503"
    res = Puller(dst, server.url, policy=FAST).pull("app", tag="app")
    assert res.blobs_fetched == res.blobs_needed and "app" in dst.index()


def test_gets_run_in_parallel_but_bounded_with_a_progress_bar(src, dst, chunker, hasher,
                                                              server, tmp_path, capsys):
    imported(src, chunker, hasher, make_tree(tmp_path / "tree"))
    publish(src, "app", server.root)
    server.mode = "count"
    res = Puller(dst, server.url, workers=3, policy=FAST, progress=True).pull("app", tag="app")
    assert res.blobs_fetched > 6
    assert 2 <= server.peak <= 3
    assert "pull" in capsys.readouterr().err  # tqdm's bar, forced on for the test


def test_bad_urls_are_usage_errors():
    for url in ("ftp://x/tags/a", "http://x/whatever", "http://x/manifests/zz.json"):
        with pytest.raises(UsageError):
            parse_url(url)


def test_nginx_serves_the_layout(src, dst, chunker, hasher, tmp_path):
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    tree = make_tree(tmp_path / "tree")
    imported(src, chunker, hasher, tree)
    site = tmp_path / "site"
    pub = publish(src, "app", site, gzip=True)
    assert pub.gzipped > 0
    with Nginx(site, tmp_path / "nginx") as web:
        res = Puller(dst, web.url, policy=FAST).pull("app", tag="app")
    out = tmp_path / "out"
    filetree.restore(dst.flatten("app"), dst.store, out, hasher)
    assert res.blobs_fetched > 0 and filetree.diff_trees(tree, out) == []
    assert res.bytes_fetched < pub.bytes_written  # compressible blobs came gzipped


def test_rm_unknown_image_and_bad_name(src, chunker, hasher, tmp_path):
    with pytest.raises(ImageError, match="no image named"):
        src.remove("nope")
    with pytest.raises(UsageError, match="bad image name"):
        imported(src, chunker, hasher, make_tree(tmp_path / "t"), "../evil")
    assert src.index() == {}


def test_layer_shared_by_two_names_holds_one_set_of_refs(src, chunker, hasher, tmp_path):
    tree = make_tree(tmp_path / "tree")
    imported(src, chunker, hasher, tree, "one")
    refs_one = {d: src.store.refs(d) for d in src.store.digests()}
    imported(src, chunker, hasher, tree, "two")  # same layer: capture's extra refs returned
    assert {d: src.store.refs(d) for d in src.store.digests()} == refs_one
    src.remove("one")
    assert json.loads((src.root / "index.json").read_text())["images"].keys() == {"two"}
    assert {d: src.store.refs(d) for d in src.store.digests()} == refs_one
