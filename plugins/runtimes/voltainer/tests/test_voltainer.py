"""Voltainer: the FUSE view of an image, and containers on it under systemd-nspawn.

The container tests use a real debootstrap rootfs published over HTTP on
loopback and pulled into a fresh store, as a user would get an image.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stellarium_core.errors import ConfigError
from stellarium_core.volumes import filetree
from tests.helpers import new_store, run_cli, stellar_json

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="FUSE mounts and nspawn need root")
NEEDS_FUSE = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
NEEDS_NSPAWN = pytest.mark.skipif(shutil.which("systemd-nspawn") is None,
                                  reason="systemd-nspawn is not installed")


def stellar(cfg: Path, *args: object) -> Any:
    return stellar_json(cfg, *args, timeout=600)


def voltainer(cfg: Path, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli(["--config", cfg, *args], tool="voltainer", timeout=timeout)


def mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as fh:
        return [ln.split()[4] for ln in fh if ln.split()[4].startswith(str(path))]


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc/small.conf").write_text("a small file\n")
    (root / "bin/big").write_bytes(os.urandom(700_000))
    (root / "bin/empty").touch()
    os.link(root / "bin/big", root / "bin/big-again")
    os.symlink("../bin/big", root / "etc/link")
    os.chmod(root / "bin/big", 0o4755)
    os.chown(root / "etc/small.conf", 1234, 5678)
    os.setxattr(root / "etc/small.conf", "user.origin", b"test")
    os.mkfifo(root / "etc/fifo")
    os.mknod(root / "etc/null", 0o666 | 0o020000, os.makedev(1, 3))
    return root


@ROOT_ONLY
@NEEDS_FUSE
def test_fuse_view_is_identical_to_the_source_tree(tmp_path: Path) -> None:
    cfg = new_store(tmp_path)
    src = make_tree(tmp_path / "tree")
    digest = stellar(cfg, "image", "import", src, "t")["digest"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "voltainer.serve", "--config", str(cfg),
                             digest, str(mnt)], stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if str(mnt) in mounts_below(mnt) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert str(mnt) in mounts_below(mnt), proc.stderr.read().decode()
        assert filetree.diff_trees(src, mnt) == []
        with pytest.raises(OSError):  # read-only: nothing can be written through the view
            (mnt / "etc/new").write_text("x")
        # Reads in the middle of a multi-chunk file map onto the right chunks.
        with open(mnt / "bin/big", "rb") as fh:
            fh.seek(333_333)
            assert fh.read(100_000) == (src / "bin/big").read_bytes()[333_333:433_333]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        proc.wait(timeout=30)
    assert mounts_below(mnt) == []


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real Debian rootfs: imported, published, served on loopback, pulled fresh."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("systemd-nspawn"):
        pytest.skip("needs root, /dev/fuse and systemd-nspawn")
    from devtools.rootfs import debian_rootfs

    try:
        rootfs = debian_rootfs()
    except RuntimeError as exc:
        pytest.skip(f"no debootstrap rootfs: {exc}")
    base = tmp_path_factory.mktemp("voltainer")
    publisher = new_store(base / "publisher")
    stellar(publisher, "image", "import", rootfs, "debian")
    site = base / "site"
    tag = stellar(publisher, "publish", "debian", site)["tag"]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = new_store(base / "runner")
        got = stellar(cfg, "pull", f"http://127.0.0.1:{srv.server_port}/{tag}", "debian")
        assert got["blobs_fetched"] == got["blobs_needed"] > 1000
    finally:
        srv.shutdown()
        srv.server_close()
    return cfg, rootfs


@pytest.mark.slow
@NEEDS_NSPAWN
def test_container_runs_on_pulled_image(pulled: tuple[Path, Path]) -> None:
    cfg, rootfs = pulled
    r = voltainer(cfg, "run", "debian", "--", "cat", "/etc/debian_version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (rootfs / "etc/debian_version").read_text()

    # Exit codes pass through; writes land in the throwaway upper layer only.
    r = voltainer(cfg, "run", "--private-network", "debian", "--", "sh", "-c",
                  "ls /sys/class/net; echo changed > /etc/debian_version; exit 42")
    assert r.returncode == 42, r.stderr
    assert r.stdout.split() == ["lo"]  # a private network has only loopback
    r = voltainer(cfg, "run", "debian", "--", "cat", "/etc/debian_version")
    assert r.stdout == (rootfs / "etc/debian_version").read_text()
    store = cfg.parent / "store"
    assert mounts_below(store) == [] and list((store / "runtime").iterdir()) == []
    names = [r["name"] for r in stellar(cfg, "image", "ls")["images"]]
    assert names == ["debian"]  # the per-run pins are gone
    # Each run's FUSE server read through PHOTON: what the first verified and
    # decompressed, the later ones found in the host-wide hot tier.
    tiers = {t["level"]: t for t in stellar(cfg, "tiers")["tiers"]}
    assert tiers["hot"]["plugin"] == "shm" and tiers["hot"]["objects"] > 0
    assert tiers["warm"]["hits"] > 0 and tiers["hot"]["hits"] > 0, tiers


@pytest.mark.slow
@NEEDS_NSPAWN
def test_run_announces_start_and_stop_to_plugins(pulled: tuple[Path, Path]) -> None:
    from voltainer.runner import run

    from stellarium_core import config as config_mod
    from stellarium_core.hookspecs import hookimpl
    from stellarium_core.host import Host

    events: list[tuple] = []

    class Listener:
        @hookimpl
        def stellarium_instance_started(self, runtime: str, instance: str, info: dict) -> None:
            events.append(("started", runtime, instance, info["image"], info["command"]))

        @hookimpl
        def stellarium_instance_stopped(self, runtime: str, instance: str,
                                        exit_code: int) -> None:
            events.append(("stopped", runtime, instance, exit_code))

    cfg, _ = pulled
    host = Host(config_mod.load(cfg))
    host.registry.pm.register(Listener())
    assert run(host, "debian", ["sh", "-c", "exit 7"], config=str(cfg)) == 7
    assert [e[:2] for e in events] == [("started", "voltainer"), ("stopped", "voltainer")]
    cid = events[0][2]
    assert cid.startswith("vt-debian-") and events[1][2] == cid
    assert events[0][3:] == ("debian", ["sh", "-c", "exit 7"]) and events[1][3] == 7


@pytest.mark.slow
@NEEDS_NSPAWN
def test_sigkilled_run_is_cleaned_by_gc(pulled: tuple[Path, Path]) -> None:
    cfg, _ = pulled
    store = cfg.parent / "store"
    marker = f"{random.randint(100, 999)}.{random.randint(10**5, 10**6)}"  # a unique cmdline
    proc = subprocess.Popen([sys.executable, "-m", "voltainer", "--config", str(cfg), "run",
                             "debian", "--", "sleep", marker])
    for _ in range(600):
        if len(mounts_below(store / "runtime")) == 2:
            break
        time.sleep(0.05)
    assert len(mounts_below(store / "runtime")) == 2
    for _ in range(600):  # until the container's command is running
        if subprocess.run(["pgrep", "-f", f"sleep {marker}"],
                          capture_output=True).returncode == 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.5)
    assert mounts_below(store / "runtime"), "a crash leaves the overlay mounted"
    assert len(list((store / "runtime").iterdir())) == 1
    names = [r["name"] for r in stellar(cfg, "image", "ls")["images"]]
    assert len(names) == 2 and any(n.startswith("voltainer/") for n in names)
    r = voltainer(cfg, "gc", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["cleaned"]) == 1
    assert mounts_below(store / "runtime") == [] and list((store / "runtime").iterdir()) == []
    ps = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "no container process outlives the cleanup"
    assert [r["name"] for r in stellar(cfg, "image", "ls")["images"]] == ["debian"]


def test_run_without_command_or_unknown_image_is_a_clear_error(tmp_path: Path) -> None:
    cfg = new_store(tmp_path)
    if shutil.which("systemd-nspawn"):
        tree = tmp_path / "tree"
        (tree / "etc").mkdir(parents=True)
        stellar(cfg, "image", "import", tree, "bare")
        r = voltainer(cfg, "run", "bare")
        assert r.returncode == 2 and "no command given" in r.stderr
        r = voltainer(cfg, "run", "nope", "--", "true")
        assert r.returncode == 1 and "no image named 'nope'" in r.stderr
        assert "Traceback" not in r.stderr


def test_nspawn_line_carries_image_config_and_options(tmp_path: Path) -> None:
    from voltainer.runner import nspawn_command

    cmd = nspawn_command(tmp_path, "vt-x", ["env"], private_network=True,
                         config={"Env": ["A=1", "bogus"], "WorkingDir": "/srv"})
    assert cmd[:4] == ["systemd-nspawn", "-q", "--register=no", "--keep-unit"]
    assert "--setenv=A=1" in cmd and "--setenv=bogus" not in cmd and "--chdir=/srv" in cmd
    assert "--private-network" in cmd and cmd[-2:] == ["--", "env"]


def test_default_command_comes_from_a_well_formed_image_config() -> None:
    from voltainer.runner import RunError, image_command

    assert image_command({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]}) == [
        "/bin/sh", "-c", "echo hi"]
    assert image_command({"Cmd": None}) == []
    for bad in ({"Cmd": "echo hi"}, {"Entrypoint": [1]}, {"Cmd": {"a": 1}}):
        with pytest.raises(RunError, match="not a list of strings"):
            image_command(bad)


def test_plugin_is_found_through_its_entry_point() -> None:
    from stellarium_core.plugins import Registry

    rt = Registry().create("runtime", "voltainer", {})
    assert rt.name == "voltainer" and callable(rt.run)
    with pytest.raises(ConfigError) as exc:
        Registry().create("runtime", "voltainer", {"privat_network": True})
    assert exc.value.key == "params.privat_network"


def test_view_reads_ranges_across_chunks_and_refuses_orphans() -> None:
    from voltainer.fusefs import read_range, tree_from_manifest

    from stellarium_core.volumes.tinyvol import ManifestError

    parts = [bytes([i]) * n for i, n in enumerate((5, 7, 3), start=1)]
    chunks = {bytes([i]) * 32: p for i, p in enumerate(parts)}
    root = filetree.Entry(".", "dir", 0o755, 0, 0, 0)
    f = filetree.Entry("f", "file", 0o644, 0, 0, 0, size=15,
                       chunks=[(d, len(p)) for d, p in chunks.items()])
    link = filetree.Entry("g", "hardlink", 0o644, 0, 0, 0, target="f")
    tree = tree_from_manifest(filetree.Manifest([root, f, link]))
    node = tree.lookup("/f")
    assert node is tree.lookup("/g") and node.nlink == 2  # one inode, two names
    whole = b"".join(parts)
    for off, size in ((0, 15), (3, 6), (5, 7), (11, 100), (15, 1)):
        assert read_range(node, off, size, chunks.__getitem__) == whole[off:off + size]
    orphan = filetree.Entry("no/such/parent", "file", 0o644, 0, 0, 0)
    with pytest.raises(ManifestError, match="not a directory"):
        tree_from_manifest(filetree.Manifest([root, orphan]))
