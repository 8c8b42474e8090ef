"""Host config: defaults, precise errors, and `stellar host init|show` through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from stellarium_core import config
from stellarium_core.errors import ConfigError
from tests.helpers import run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "host.toml"
    path.write_text(text)
    return path


def test_defaults_fill_every_section(tmp_path: Path) -> None:
    from stellarium_core.host import Host

    cfg = config.parse({}, None)
    assert cfg.hasher.name == "blake3" and cfg.chunker.name == "fastcdc"
    assert cfg.tiers == {} and cfg.vm == {}
    # The [vm] defaults are the VM runtime's (Volt's VmConfig), filled in by that plugin.
    vm = Host(cfg).effective()["vm"]
    assert (vm["memory_mib"], vm["vcpus"], vm["kernel"], vm["devices"]) == (128, 1, "", [])
    assert vm["cmdline"].startswith("console=ttyS0")


def test_store_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\npath = "data/store"\n')
    assert config.load(path).store_path == (tmp_path / "data/store").resolve()


def test_sizes_accept_units() -> None:
    assert config.parse_size("64KiB") == 65536
    assert config.parse_size("2 GiB") == 2 << 30
    assert config.parse_size(4096) == 4096
    with pytest.raises(ValueError, match="not a size"):
        config.parse_size("12 parsecs")


def test_tiers_are_parsed_with_capacity(tmp_path: Path) -> None:
    path = write(tmp_path, '[tiers.hot]\nplugin = "memory"\ncapacity = "256MiB"\n')
    tier = config.load(path).tiers["hot"]
    assert (tier.plugin, tier.capacity, tier.params) == ("memory", 256 << 20, {})


def test_explicit_missing_file_is_an_error_but_default_is_not(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert config.load(None).source is None


def test_env_var_is_used_when_no_flag(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, "[vm]\nvcpus = 3\n")
    monkeypatch.setenv(config.ENV_VAR, str(path))
    assert config.load(None).vm["vcpus"] == 3


BAD_CONFIGS = {
    "syntax": ("[store\npath = 1\n", "TOML syntax error"),
    "unknown section": ("[stor]\n", "stor: unknown section"),
    "unknown key": ('[store]\npaht = "x"\n', "store.paht: unknown key"),
    "wrong type": ("[vm]\nmemory_mib = \"lots\"\n", "vm.memory_mib: expected an integer"),
    "bool is not int": ("[vm]\nvcpus = true\n", "vm.vcpus: expected an integer"),
    "impossible value": ("[vm]\nmemory_mib = 4\n", "vm.memory_mib: must be 8..65536 MiB"),
    "vm unknown key": ("[vm]\nmem = 64\n", "vm.mem: unknown key"),
    "vm bad device": ("[vm]\ndevices = [{id = \"x\"}]\n", "vm.devices: [0].plugin: missing"),
    "vm hugepages with ksm": ("[vm]\nhugepages = true\nksm = true\n",
                              "vm.ksm: KSM cannot merge huge pages"),
    "compressor missing": ('[compressor]\nname = "zip"\n',
                           "compressor: no compressor plugin named 'zip'"),
    "compressor param": ('[compressor]\nname = "zstd"\n[compressor.params]\nlevel = 99\n',
                         "compressor.params.level: must be -7..-1 or 1..22, got 99"),
    "compression moved": ('[store]\ncompression = "lz4"\n',
                          'store.compression: compression is chosen in its own section now'),
    "unknown tier level": ('[tiers.lukewarm]\nplugin = "memory"\n',
                           "tiers.lukewarm: unknown tier level"),
    "tier without plugin": ("[tiers.hot]\ncapacity = 5\n",
                            "tiers.hot.plugin: missing required key"),
    "bad size": ('[tiers.hot]\nplugin = "memory"\ncapacity = "lots"\n', "tiers.hot.capacity:"),
    "plugin param unknown": ("[chunker.params]\nfoo = 1\n", "chunker.params.foo: unknown key"),
    "chunk size too small": ("[chunker.params]\nmin_size = 64\navg_size = 256\n",
                             "chunker.params.min_size: must be at least 1024 (1 KiB), got 64: "
                             "NEBULA gives every chunk its own record and index entry"),
    "chunk size too big": ('[chunker.params]\nmax_size = "1TiB"\n',
                           "chunker.params.max_size: must be at most 8388608 (8 MiB)"),
    "fixed chunk too big": ('[chunker]\nname = "fixed"\n[chunker.params]\nsize = "64MiB"\n',
                            "chunker.params.size: must be 4 KiB..8 MiB, got 67108864"),
    "plugin param impossible": ("[chunker.params]\navg_size = 1000\n",
                                "chunker.params.avg_size: must be a power of two"),
    "plugin param order": ('[chunker.params]\nmin_size = "128KiB"\nmax_size = "64KiB"\n',
                           "chunker.params.min_size: need min_size <= avg_size"),
    "plugin missing": ('[hasher]\nname = "md4"\n', "hasher: no hasher plugin named 'md4'"),
    "remote durability, no cold tier": (
        '[store]\npath = "store"\ndurability = "remote"\n',
        'store.durability: durability "remote" needs a cold tier'),
    "bad durability": ('[store]\npath = "store"\ndurability = "cloud"\n',
                       "store.durability: must be one of local, remote"),
    "peer not a URL": ('[cluster]\npeers = { b = "ftp://b/x" }\n',
                       "cluster.peers: peer 'b': expected a base URL"),
    "listen without port": ('[cluster]\nlisten = "7070"\n', "cluster.listen: expected HOST:PORT"),
    "node is its own peer": ('[cluster]\nnode = "a"\npeers = { a = "http://a:1" }\n',
                             "cluster.peers: this node ('a') is listed as its own peer"),
    "no peer to ask": ("[cluster]\nfanout = 0\n", "cluster.fanout: must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_gives_one_precise_message_exit_2_and_creates_nothing(
    tmp_path: Path, case: str
) -> None:
    text, expected = BAD_CONFIGS[case]
    path = write(tmp_path, f'[store]\npath = "store"\n{text}' if "[store" not in text else text)
    for action in ("init", "show"):
        proc = run_cli(["--config", path, "host", action])
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(path) in lines[0] and expected in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store").exists()


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    proc = run_cli(["--config", tmp_path / "nope.toml", "host", "show"])
    assert proc.returncode == 2
    assert "nope.toml: no such file" in proc.stderr


def test_store_path_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    path = write(tmp_path, '[store]\npath = "afile/store"\n')
    proc = run_cli(["--config", path, "host", "init"])
    assert proc.returncode == 2
    assert "store.path:" in proc.stderr and "is not a directory" in proc.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_store_path_on_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        path = write(tmp_path, '[store]\npath = "ro/store"\n')
        proc = run_cli(["--config", path, "host", "init"])
        assert proc.returncode == 2, proc.stderr
        assert "store.path:" in proc.stderr and ("read-only" in proc.stderr
                                                 or "not writable" in proc.stderr)
        assert os.listdir(ro) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_host_init_creates_layout_and_show_fills_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\npath = "store"\n[chunker.params]\navg_size = "32KiB"\n')
    proc = run_cli(["--config", path, "host", "init"])
    assert proc.returncode == 0, proc.stderr
    store = tmp_path / "store"
    assert {p.name for p in store.iterdir()} >= {"nebula", "volumes", "images", "records",
                                                   "stellarium.json"}
    shown = json.loads(run_cli(["--config", path, "host", "show", "--json"]).stdout)
    assert shown["chunker"]["params"] == {"min_size": 16384, "avg_size": 32768,
                                          "max_size": 262144}
    assert shown["hasher"]["params"] == {"max_threads": 1}
    assert shown["store"]["path"] == str(store.resolve())
    # Idempotent: a second init succeeds and keeps the store.
    assert run_cli(["--config", path, "host", "init"]).returncode == 0


def test_changing_the_hasher_of_an_existing_store_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[store]\npath = "store"\n')
    assert run_cli(["--config", path, "host", "init"]).returncode == 0
    meta = tmp_path / "store" / "stellarium.json"
    data = json.loads(meta.read_text())
    data["hasher"] = "sha256"
    meta.write_text(json.dumps(data))
    proc = run_cli(["--config", path, "host", "init"])
    assert proc.returncode == 2
    assert "hasher.name" in proc.stderr and "created with hasher 'sha256'" in proc.stderr


@pytest.mark.parametrize("junk", ["not json", "[1]"])
def test_damaged_store_metadata_is_one_clear_error(tmp_path: Path, junk: str) -> None:
    path = write(tmp_path, '[store]\npath = "store"\n')
    assert run_cli(["--config", path, "host", "init"]).returncode == 0
    (tmp_path / "store" / "stellarium.json").write_text(junk)
    proc = run_cli(["--config", path, "host", "init"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "stellarium.json: unreadable store metadata" in proc.stderr


def test_show_toml_output_parses_back(tmp_path: Path) -> None:
    import tomllib

    path = write(tmp_path, '[store]\npath = "s"\n[vm]\nvcpus = 2\n')
    proc = run_cli(["--config", path, "host", "show"])
    assert proc.returncode == 0, proc.stderr
    assert tomllib.loads(proc.stdout)["vm"]["vcpus"] == 2


def test_usage_error_exits_2() -> None:
    proc = run_cli(["no-such-command"])
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
