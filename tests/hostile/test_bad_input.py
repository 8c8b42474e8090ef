"""Class 5 and the "Also" items of issue #18: every bad input is one clear line
with the documented exit code (0 ok, 1 failed operation, 2 bad usage or config),
never a traceback, a hang or unbounded work."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stellarium_core.config import parse_size
from stellarium_core.distribution import FetchError, FetchPolicy, ImageError
from stellarium_core.distribution.fetch import Fetcher
from stellarium_core.errors import ConfigError, UsageError
from stellarium_core.fsutil import remove_tree
from stellarium_core.nebula import ChunkError
from stellarium_core.nebula.ingest import ingest
from stellarium_core.plugins import Registry
from stellarium_core.volumes import filetree
from tests.helpers import new_store, run_cli
from tests.hostile.common import (
    HASHER,
    HOSTILE,
    TRACEBACK,
    chunker,
    image_store,
    importer,
    leftovers,
    sandbox,
    stellar,
    tar_of,
)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=8)


def one_line(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


# -- deep trees ---------------------------------------------------------------------------


def deep_tar(path: Path, depth: int) -> Path:
    members = [("/".join(["d"] * (i + 1)), "dir", None, 0o755) for i in range(depth)]
    members.append(("/".join(["d"] * depth) + "/leaf", "file", b"bottom", 0o644))
    path.write_bytes(tar_of(members, path.parent))
    return path


def test_a_tree_deeper_than_the_recursion_limit_imports_restores_and_ingests(tmp_path):
    depth = sys.getrecursionlimit() + 200
    with image_store(tmp_path / "store") as images:
        importer(images).import_path(deep_tar(tmp_path / "deep.tar", depth), "deep")
        m = images.flatten("deep")
        assert len(m) == depth + 2
        out = tmp_path / "out"
        try:
            filetree.restore(m, images.store, out, HASHER)
            leaf = out / "/".join(["d"] * depth) / "leaf"
            assert leaf.read_bytes() == b"bottom"
            again = filetree.capture(out, images.store, chunker(), HASHER)
            assert [e.path for e in again] == [e.path for e in m]
            assert filetree.diff_trees(out, out) == []
            assert ingest(images.store, out, chunker()).files == 1
            assert leftovers(tmp_path / "store") == []
        finally:
            remove_tree(out)  # pytest's own cleanup (shutil.rmtree) recurses per level


def test_a_tree_too_deep_for_any_path_is_one_clear_line(tmp_path):
    cfg = new_store(tmp_path / "h")
    tar = deep_tar(tmp_path / "deeper.tar", 2100)    # its paths pass PATH_MAX (4096)
    err = one_line(run_cli(["--config", cfg, "image", "import", tar, "x"]), 1)
    assert "nested deeper than a path can reach" in err and len(err) < 400
    assert leftovers(tmp_path / "h" / "store") == []


def test_json_nested_deeper_than_the_parser_is_a_manifest_error(tmp_path):
    cfg = new_store(tmp_path / "h")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    err = one_line(run_cli(["--config", cfg, "tree", "restore", deep, tmp_path / "t"]), 1)
    assert "nested too deeply" in err


# -- damaged archives ---------------------------------------------------------------------


@HOSTILE
@given(packer=st.sampled_from(["", "gz", "bz2", "xz"]), how=st.sampled_from(["truncate", "flip"]),
       where=st.floats(0, 1), xor=st.integers(1, 255))
def test_a_damaged_tarball_is_an_image_error(packer, how, where, xor):
    data = tar_of([("etc", "dir", None, 0o755)] + [
        (f"etc/f{i}", "file", bytes([i]) * 3000, 0o644) for i in range(8)], Path("/"))
    pack = {"": bytes, "gz": lambda d: gzip.compress(d, mtime=0), "bz2": bz2.compress,
            "xz": lzma.compress}[packer]
    data = bytearray(pack(data))
    at = int(where * (len(data) - 1))
    if how == "truncate":
        del data[at:]
    else:
        data[at] ^= xor
    with sandbox() as tmp:
        t = tmp / "layer.tar"
        t.write_bytes(bytes(data))
        with image_store(tmp / "store") as images:
            try:
                importer(images).import_path(t, "x")
            except (ImageError, UsageError):
                assert images.index() == {}
            assert leftovers(tmp / "store") == []


# -- wrongly typed OCI and docker-save fields ---------------------------------------------

LAYER = tar_of([("etc", "dir", None, 0o755), ("etc/os-release", "file", b"ID=x\n", 0o644)],
               Path("/"))


def _blob(blobs: Path, data: bytes) -> str:
    h = hashlib.sha256(data).hexdigest()
    (blobs / h).write_bytes(data)
    return f"sha256:{h}"


def _set(doc: dict, path: tuple, value: object) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


OCI_FIELDS = [("index", p) for p in [("manifests",), ("manifests", 0),
                                     ("manifests", 0, "digest")]] + \
    [("manifest", p) for p in [("layers",), ("layers", 0), ("layers", 0, "digest"),
                               ("layers", 0, "mediaType"), ("config",),
                               ("config", "digest"), ("manifests",)]] + \
    [("config", p) for p in [("config",), ("config", "Env"), ("config", "Cmd"),
                             ("config", "Entrypoint"), ("config", "WorkingDir"),
                             ("config", "User")]]


@HOSTILE
@given(field=st.sampled_from(OCI_FIELDS), value=JSON)
def test_oci_fields_of_any_json_type(field, value):
    with sandbox() as tmp:
        blobs = tmp / "oci" / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        cfg = {"config": {"Env": ["A=1"], "Cmd": ["/bin/sh"], "Entrypoint": ["/e"],
                          "WorkingDir": "/", "User": "0"}}
        man = {"schemaVersion": 2, "layers": [{"mediaType": "tar+gzip", "digest": ""}],
               "config": {"digest": ""}}
        index = {"schemaVersion": 2, "manifests": [{"digest": ""}]}
        docs = {"config": cfg, "manifest": man, "index": index}
        _set(docs[field[0]], field[1], value)
        layer = _blob(blobs, gzip.compress(LAYER, mtime=0))
        if field != ("manifest", ("layers", 0, "digest")):
            try:
                man["layers"][0]["digest"] = layer
            except (TypeError, KeyError, IndexError):
                pass
        if field != ("manifest", ("config", "digest")):
            try:
                man["config"]["digest"] = _blob(blobs, json.dumps(cfg).encode())
            except (TypeError, KeyError):
                pass
        if field != ("index", ("manifests", 0, "digest")):
            try:
                index["manifests"][0]["digest"] = _blob(blobs, json.dumps(man).encode())
            except (TypeError, KeyError, IndexError):
                pass
        (tmp / "oci" / "index.json").write_text(json.dumps(index))
        (tmp / "oci" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        with image_store(tmp / "store") as images:
            try:
                importer(images).import_path(tmp / "oci", "x")
            except (ImageError, UsageError):
                assert images.index() == {} and images.store.stats()["chunks"] == 0
            else:
                assert set(images.image("x").config) <= {"Env", "Cmd", "Entrypoint",
                                                         "WorkingDir", "User"}


DOCKER_FIELDS = [("manifest", ()), ("manifest", (0,)), ("manifest", (0, "Config")),
                 ("manifest", (0, "Layers")), ("manifest", (0, "Layers", 0)),
                 ("config", ()), ("config", ("config",)), ("config", ("config", "Env"))]


@HOSTILE
@given(field=st.sampled_from(DOCKER_FIELDS), value=JSON)
def test_docker_save_fields_of_any_json_type(field, value):
    with sandbox() as tmp:
        manifest: object = [{"Config": "c.json", "Layers": ["l/layer.tar"]}]
        config: object = {"config": {"Env": ["A=1"]}}
        if field[1]:
            _set(manifest if field[0] == "manifest" else config, field[1], value)
        elif field[0] == "manifest":
            manifest = value
        else:
            config = value
        t = tmp / "image.tar"
        with tarfile.open(t, "w") as tar:
            for name, data in {"manifest.json": json.dumps(manifest).encode(),
                               "c.json": json.dumps(config).encode(),
                               "l/layer.tar": LAYER}.items():
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        with image_store(tmp / "store") as images:
            try:
                importer(images).import_path(t, "x")
            except (ImageError, UsageError):
                assert images.index() == {}
            assert leftovers(tmp / "store") == []


# -- chunker sizes ------------------------------------------------------------------------


@settings(HOSTILE, max_examples=200)
@given(name=st.sampled_from(["fastcdc", "fixed"]),
       sizes=st.dictionaries(st.sampled_from(["min_size", "avg_size", "max_size", "size"]),
                             st.integers(0, 1 << 42) | st.sampled_from(
                                 ["1TiB", "64", "16MiB", "8MiB", "4KiB", "lots"]),
                             max_size=3))
def test_chunker_sizes_are_bounded_or_refused(name, sizes):
    try:
        c = Registry().create("chunker", name, sizes)
    except ConfigError as exc:
        assert exc.key and str(exc)
        return
    p = c.params
    if name == "fixed":
        assert 4096 <= p["size"] <= 8 << 20
    else:
        assert 1024 <= p["min_size"] and 4096 <= p["avg_size"] and p["max_size"] <= 8 << 20
    assert c.max_size <= 8 << 20
    assert all(parse_size(v) >= 0 for v in p.values())


# -- pull: flags, URLs, trickling servers -------------------------------------------------


@HOSTILE
@given(timeout=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 10**6),
       attempts=st.integers(-3, 10**9))
def test_fetch_policy_accepts_only_finite_bounded_values(timeout, attempts):
    try:
        p = FetchPolicy(timeout=timeout, attempts=attempts)
    except UsageError:
        return
    assert 0 < p.timeout <= 86400 and 1 <= p.attempts <= 100


@pytest.mark.parametrize("args", [
    ["--timeout", "nan"], ["--timeout", "inf"], ["--timeout", "-1"], ["--timeout", "1e308"],
    ["--attempts", "0"], ["--attempts", "1000000000"], ["--workers", "0"],
    ["--workers", "100000"],
])
def test_pull_flags_out_of_range_exit_2(tmp_path, args):
    code, _, err = stellar("--config", tmp_path / "none.toml", "pull", *args,
                           "http://127.0.0.1:1/tags/x", "x")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/tags/x", "http://127.0.0.1:-1/tags/x",
                                 "http://127.0.0.1:port/tags/x", "http://[::1/tags/x"])
def test_pull_urls_with_bad_ports_exit_2(tmp_path, url):
    code, _, err = stellar("--config", tmp_path / "none.toml", "pull", url, "x")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


class Trickle:
    """A real TCP server answering every GET one byte every ``gap`` seconds."""

    def __init__(self, where: str, gap: float = 0.2) -> None:
        self.where, self.gap = where, gap
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        body = b"x" * 1000
        head = (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n"
                + b"X-Pad: y\r\n" * 50 + b"\r\n")
        with conn:
            try:
                conn.recv(65536)
                if self.where == "body":
                    conn.sendall(head)
                for b in (head + body if self.where == "headers" else body):
                    if self.stop.wait(self.gap):
                        return
                    conn.sendall(bytes([b]))
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_timeout_bounds_the_whole_transfer_of_a_trickling_server(where):
    srv = Trickle(where)
    try:
        f = Fetcher(srv.url, FetchPolicy(timeout=1.0, attempts=2, backoff=0.0))
        start = time.monotonic()
        with pytest.raises(FetchError, match="timed out: it took longer than 1 s in all"):
            f.get("blobs/x")
        took = time.monotonic() - start
        assert took < 2 * 1.0 + 2.0, took   # two attempts of 1 s, not 1000 bytes x 0.2 s
    finally:
        srv.close()


def test_pull_from_a_trickling_server_fails_in_bounded_time(tmp_path):
    cfg = new_store(tmp_path / "h")
    srv = Trickle("body")
    try:
        start = time.monotonic()
        r = run_cli(["--config", cfg, "pull", "--timeout", "1", "--attempts", "1",
                     srv.url + "tags/x", "x"])
        took = time.monotonic() - start
    finally:
        srv.close()
    assert "timed out" in one_line(r, 1) and took < 15, took


# -- a file that grows while it is ingested -----------------------------------------------


class Grows:
    """A progress sink that appends to ``path`` when ingest has listed the tree and
    is about to read it: the race, made certain."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def total(self) -> float | None:
        return None

    @total.setter
    def total(self, _: float | None) -> None:
        with open(self.path, "ab") as fh:
            fh.write(b"appended while ingesting")

    def update(self, n: float = 1) -> None:
        pass


@pytest.mark.parametrize("size", [1000, 70 << 20])   # read whole, and in windows
def test_a_file_growing_during_ingest_is_detected_and_nothing_is_kept(tmp_path, size):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "log").write_bytes(os.urandom(size))
    with image_store(tmp_path / "store") as images:
        with pytest.raises(ChunkError, match="changed size while being (ingested|stored)"):
            ingest(images.store, tree, chunker(), progress=Grows(tree / "log"))
        assert all(e.refs == 0 for _, e in images.store.items())


# -- FIFOs, devices and pseudo filesystems ------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_image_import_of_a_fifo_or_device_says_what_it_is(tmp_path, kind):
    cfg = new_store(tmp_path / "h")
    src = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        src = Path("/dev/zero")
    err = one_line(run_cli(["--config", cfg, "image", "import", src, "x"], timeout=60), 2)
    assert ("is a FIFO" if kind == "fifo" else "is a character device") in err


@pytest.mark.parametrize("path", ["/proc/stellar-store", "/sys/kernel/stellar-store",
                                  "/proc/self/fdinfo/x"])
def test_a_store_on_a_kernel_pseudo_filesystem_is_a_config_error(tmp_path, path):
    cfg = tmp_path / "host.toml"
    cfg.write_text(f'[store]\npath = "{path}"\n')
    for args in (["host", "init"], ["stats"], ["vol", "ls"]):
        err = one_line(run_cli(["--config", cfg, *args]), 2)
        assert "store.path" in err and "filesystem, which cannot hold a store" in err


VOLT = [sys.executable, "-c", "import sys; from volt.cli import main; sys.exit(main(sys.argv[1:]))"]


@pytest.mark.parametrize("role", ["kernel", "initrd"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_a_fifo_or_device_as_kernel_or_initrd_is_refused_at_once(tmp_path, role, kind):
    sys.path.insert(0, str(Path(__file__).parents[2] / "plugins/runtimes/volt/tests"))
    from tinyguest import make_elf

    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(make_elf())
    bad = tmp_path / "fifo"
    if kind == "fifo":
        os.mkfifo(bad)
    else:
        bad = Path(kind)
    args = ["run", "--kernel", bad] if role == "kernel" else \
        ["run", "--kernel", kernel, "--initrd", bad]
    r = subprocess.run([*VOLT, *map(str, args)], capture_output=True, text=True, timeout=60)
    err = one_line(r, 10 if role == "kernel" else 11)
    assert "not a regular file" in err
    r = subprocess.run([*VOLT, "kernel", "import", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert "not a regular file" in one_line(r, 2)


def test_no_cli_command_tracebacks_on_these(tmp_path):
    """A sweep of the commands above through the in-process CLI: no escaped exception."""
    cfg = new_store(tmp_path / "h")
    for args in (["tree", "restore", tmp_path / "missing.json", tmp_path / "t"],
                 ["image", "rm", "nope"], ["cat", "zz"], ["ingest", tmp_path / "missing"]):
        code, _, err = stellar("--config", cfg, *args)
        assert code in (1, 2) and code != TRACEBACK and err.count("\n") == 1, (args, err)
