"""Volt is found as the ``volt`` runtime plugin through the registry."""

from __future__ import annotations

import pytest
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import Runtime
from stellarium_core.plugins import Registry


def test_registry_creates_volt_runtime_with_defaults():
    rt = Registry().create("runtime", "volt", {"memory_mib": 64, "vcpus": 2})
    assert isinstance(rt, Runtime) and rt.name == "volt"
    cfg = rt.config({"kernel": "/k", "vcpus": 1})
    assert (cfg.kernel, cfg.memory_mib, cfg.vcpus) == ("/k", 64, 1)
    assert rt.params["memory_mib"] == 64 and rt.params["cmdline"]     # defaults filled in


def test_unknown_or_impossible_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="params.warp: unknown key"):
        Registry().create("runtime", "volt", {"warp": 9})
    with pytest.raises(ConfigError, match="params.vcpus: must be 1..32, got 0"):
        Registry().create("runtime", "volt", {"vcpus": 0})
    rt = Registry().create("runtime", "volt", {})
    with pytest.raises(ConfigError, match="memory_mib: expected an integer"):
        rt.config({"memory_mib": "lots"})


def test_run_without_kernel_or_with_a_bad_one_has_the_kernel_exit_code(tmp_path):
    rt = Registry().create("runtime", "volt", {})
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    for spec, message in (({}, "no kernel"),
                          ({"kernel": str(tmp_path / "missing")}, "No such file")):
        with pytest.raises(VoltError, match=message) as err:
            rt.run({**spec, "config": str(cfg)})
        assert err.value.exit_code == exitcodes.KERNEL
