"""Plugin discovery through installed entry points, selection by name, and failures.

Extra plugins are "installed" for real: either by pip into a target directory
(the example third-party distribution) or as a dist-info directory on
PYTHONPATH, which is exactly what importlib.metadata reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stellarium_core import config, plugins
from stellarium_core.errors import PluginError
from stellarium_core.host import Host
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


def fake_distribution(site: Path, dist: str, module: str, source: str, entry_points: str) -> None:
    """Install a one-module distribution into ``site`` the way pip lays it out."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (info / "RECORD").write_text("")


def test_installed_plugins_are_discovered_from_metadata() -> None:
    found = {(p.namespace, p.name): p for p in plugins.installed()}
    assert found[("stellarium.hashers", "blake3")].distribution == "stellarium-core"
    assert found[("stellarium.chunkers", "fastcdc")].distribution == "stellarium-chunker-fastcdc"
    assert found[("stellarium.chunkers", "fixed")].distribution == "stellarium-chunker-fastcdc"


def test_registry_creates_by_name_and_validates_params() -> None:
    reg = plugins.Registry()
    chunker = reg.create("chunker", "fastcdc", {"avg_size": "16KiB", "min_size": 4096,
                                                "max_size": "64KiB"})
    data = memoryview(bytes(range(256)) * 4096)
    lengths = list(chunker.cut(data))
    assert sum(lengths) == len(data)
    assert all(len_ <= 64 * 1024 for len_ in lengths)
    fixed = reg.create("chunker", "fixed", {"size": 4096})
    assert list(fixed.cut(memoryview(b"x" * 10000))) == [4096, 4096, 1808]
    hasher = reg.create("hasher", "blake3", {})
    import blake3

    assert hasher.digest(b"abc") == blake3.blake3(b"abc").digest()


def test_fastcdc_cuts_depend_on_content_not_position() -> None:
    """Inserting bytes at the front shifts only the first boundaries."""
    import random

    chunker = plugins.Registry().create("chunker", "fastcdc", {})
    rng = random.Random(7)
    data = rng.randbytes(4 << 20)

    def chunks(buf: bytes) -> set[bytes]:
        out, pos = set(), 0
        for n in chunker.cut(memoryview(buf)):
            out.add(buf[pos:pos + n])
            pos += n
        return out

    a, b = chunks(data), chunks(b"inserted" + data)
    assert len(a & b) >= len(a) - 2


def test_host_selects_plugins_named_in_config(tmp_path: Path) -> None:
    path = tmp_path / "host.toml"
    path.write_text('[chunker]\nname = "fixed"\n[chunker.params]\nsize = "4KiB"\n')
    host = Host(config.load(path))
    assert host.chunker.name == "fixed" and host.chunker.max_size == 4096
    assert host.hasher.name == "blake3"


def test_missing_plugin_lists_what_is_installed() -> None:
    with pytest.raises(PluginError) as err:
        plugins.Registry().load("chunker", "rabin")
    assert "no chunker plugin named 'rabin'" in str(err.value)
    assert "fastcdc" in str(err.value) and "fixed" in str(err.value)


def _cli_with_site(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(list(args), env={"PYTHONPATH": str(site)})


def test_plugin_that_fails_to_import_names_its_distribution(tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "stellarium-broken", "stellarium_broken",
                      "import does_not_exist_anywhere\n",
                      "[stellarium.hashers]\nbroken = stellarium_broken\n")
    cfg = tmp_path / "host.toml"
    cfg.write_text('[hasher]\nname = "broken"\n')
    listed = _cli_with_site(site, "plugins", "--json")
    assert listed.returncode == 0, "a broken plugin must not break listing: " + listed.stderr
    assert {"name": "broken", "distribution": "stellarium-broken"}.items() <= next(
        p for p in json.loads(listed.stdout) if p["name"] == "broken").items()
    proc = _cli_with_site(site, "--config", str(cfg), "host", "show")
    assert proc.returncode == 2
    msg = proc.stderr.strip()
    assert len(msg.splitlines()) == 1, msg
    assert "stellarium-broken 1.2.3" in msg and "failed to load" in msg
    assert "does_not_exist_anywhere" in msg


def test_plugin_that_breaks_its_spec_is_rejected(tmp_path: Path) -> None:
    site = tmp_path / "site"
    fake_distribution(site, "stellarium-wrongsig", "stellarium_wrongsig", """
        from stellarium_core.hookspecs import hookimpl

        @hookimpl
        def stellarium_hasher(name, params, colour):
            return None
        """, "[stellarium.hashers]\nwrongsig = stellarium_wrongsig\n")
    fake_distribution(site, "stellarium-nohook", "stellarium_nohook", """
        from stellarium_core.hookspecs import hookimpl

        @hookimpl
        def stellarium_chunker(name, params):
            return None
        """, "[stellarium.hashers]\nnohook = stellarium_nohook\n")
    for name, reason in (("wrongsig", "colour"), ("nohook", "implements no stellarium_hasher")):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'[hasher]\nname = "{name}"\n')
        proc = _cli_with_site(site, "--config", str(cfg), "host", "show")
        assert proc.returncode == 2, proc.stderr
        assert "breaks its contract" in proc.stderr and reason in proc.stderr
        assert f"stellarium-{name} 1.2.3" in proc.stderr


def test_third_party_example_plugin_extends_the_system(tmp_path: Path) -> None:
    """pip-install examples/sha256-hasher into a target dir; the core finds and uses it."""
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT / "examples" / "sha256-hasher")],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    listed = json.loads(_cli_with_site(site, "plugins", "--kind", "hasher", "--json").stdout)
    assert ("sha256", "stellarium-example-sha256", "1.0.0") in {
        (p["name"], p["distribution"], p["version"]) for p in listed}
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n[hasher]\nname = "sha256"\n')
    proc = _cli_with_site(site, "--config", str(cfg), "host", "init")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "store" / "stellarium.json").read_text())
    assert meta["hasher"] == "sha256"
    check = subprocess.run(
        [sys.executable, "-c",
         "import hashlib; from stellarium_core.plugins import Registry;"
         "h = Registry().create('hasher', 'sha256');"
         "assert h.digest(b'x') == hashlib.sha256(b'x').digest(); print('ok')"],
        capture_output=True, text=True, env={**__import__('os').environ, "PYTHONPATH": str(site)})
    assert check.stdout.strip() == "ok", check.stderr


def test_plugins_cli_table_lists_namespace_name_distribution_version() -> None:
    proc = run_cli(["plugins"])
    assert proc.returncode == 0
    header = proc.stdout.splitlines()[0].split()
    assert header == ["NAMESPACE", "NAME", "DISTRIBUTION", "VERSION"]
    assert any(line.split()[:3] == ["stellarium.chunkers", "fastcdc", "stellarium-chunker-fastcdc"]
               for line in proc.stdout.splitlines())


def _listing_process(site: Path, cache: Path) -> dict:
    """Plugins a fresh process lists, and whether it had to read package metadata."""
    code = ("import json, sys; from stellarium_core import plugins; "
            "names = sorted(p.name for p in plugins.installed()); "
            "print(json.dumps({'names': names, "
            "'scanned': 'importlib.metadata' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(site), "XDG_CACHE_HOME": str(cache),
                                         "PATH": "/usr/bin:/bin"}).stdout
    return json.loads(out)


def test_entry_points_are_read_once_and_rescanned_when_distributions_change(
        tmp_path: Path) -> None:
    site, cache = tmp_path / "site", tmp_path / "cache"
    site.mkdir()
    first = _listing_process(site, cache)
    assert first["scanned"] and "blake3" in first["names"]
    again = _listing_process(site, cache)
    assert again == {"names": first["names"], "scanned": False}   # the cache answered
    fake_distribution(site, "stellarium-late", "stellarium_late", "",
                      "[stellarium.hashers]\nlate = stellarium_late\n")
    after = _listing_process(site, cache)                          # a new distribution
    assert after["scanned"] and "late" in after["names"]
