"""``stellar tiers`` and building the router from a real host config file."""

from __future__ import annotations

import json
from pathlib import Path

from stellarium_core.host import Host
from stellarium_core.photon import from_host
from tests.helpers import run_cli

CONFIG = """
[store]
path = "store"

[tiers.hot]
plugin = "memory"
capacity = "1MiB"
params = {{ min_available = 0 }}

[tiers.warm]
plugin = "nvme"
capacity = "{warm}"
"""


def write_config(tmp_path: Path, warm: str = "64MiB", extra: str = "") -> Path:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG.format(warm=warm) + extra)
    return cfg


def test_router_from_host_and_tiers_report(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    with from_host(Host.from_config(cfg)) as r:
        assert r.capacities == {"hot": 1 << 20, "warm": 64 << 20}
        assert r.min_available == 0
        keys = [r.put(bytes([i]) * 5000) for i in range(3)]
        for k in keys + keys[:1] * 2:  # the second read of keys[0] makes it hot
            r.get(k)
    res = run_cli(["--config", cfg, "tiers", "--json"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    hot, warm = data["tiers"]
    assert (hot["level"], hot["plugin"], hot["objects"]) == ("hot", "memory", 0)  # per process
    assert hot["capacity_bytes"] == 1 << 20 and hot["misses"] == 4 and hot["hits"] == 1
    assert hot["hit_rate"] == 0.2
    assert (warm["objects"], warm["used_bytes"], warm["hits"], warm["misses"]) == (3, 15000, 4, 0)
    assert data["writeback"]["pending"] == 0
    human = run_cli(["--config", cfg, "tiers"])
    assert human.returncode == 0
    assert "HIT RATE" in human.stdout and "20.0%" in human.stdout and "14.6 KiB" in human.stdout


def test_hot_capacity_is_the_tighter_of_config_and_backend(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text(CONFIG.format(warm="1MiB").replace("min_available = 0",
                                                      'min_available = 0, capacity = "64KiB"'))
    with from_host(Host.from_config(cfg)) as r:
        assert r.capacities["hot"] == 64 << 10
        assert "warm" in r.tiers and r.tiers["warm"].name == "nvme"  # configured, not NEBULA


def test_default_tiers_are_the_host_wide_shm_and_nebula(tmp_path: Path) -> None:
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    res = run_cli(["--config", cfg, "tiers", "--json"])
    assert res.returncode == 0, res.stderr
    assert [(t["level"], t["plugin"]) for t in json.loads(res.stdout)["tiers"]] == \
        [("hot", "shm")]  # no store yet: no NEBULA to be warm
    assert run_cli(["--config", cfg, "host", "init"]).returncode == 0
    rows = json.loads(run_cli(["--config", cfg, "tiers", "--json"]).stdout)["tiers"]
    assert [(t["level"], t["plugin"], t["capacity_bytes"]) for t in rows] == \
        [("hot", "shm", 256 << 20), ("warm", "nebula", None)]


def test_unknown_tier_plugin_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra='\n[tiers.cold]\nplugin = "tape"\n')
    res = run_cli(["--config", cfg, "tiers"])
    assert res.returncode == 2
    assert "tiers.cold" in res.stderr and "no tier plugin named 'tape'" in res.stderr
    assert "Traceback" not in res.stderr


def test_bad_tier_param_names_file_and_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, warm="lots")
    res = run_cli(["--config", cfg, "tiers"])
    assert res.returncode == 2 and "tiers.warm.capacity" in res.stderr
    assert "Traceback" not in res.stderr
