"""Volt is found as the ``volt`` runtime plugin through the registry."""

from __future__ import annotations

import pytest
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import Runtime
from stellarium_core.plugins import Registry


def test_registry_creates_volt_runtime_with_defaults():
    rt = Registry().create("runtime", "volt", {"mem_mib": 64, "vcpus": 2})
    assert isinstance(rt, Runtime) and rt.name == "volt"
    cfg = rt.config({"kernel": "/k", "vcpus": 1})
    assert (cfg.kernel, cfg.mem_mib, cfg.vcpus) == ("/k", 64, 1)


def test_unknown_parameter_and_missing_kernel_are_config_errors():
    with pytest.raises(ConfigError, match="unknown parameter"):
        Registry().create("runtime", "volt", {"warp": 9})
    rt = Registry().create("runtime", "volt", {})
    with pytest.raises(ConfigError, match="needs a kernel"):
        rt.config({})


def test_run_reports_bad_kernel_with_its_exit_code(tmp_path):
    rt = Registry().create("runtime", "volt", {})
    with pytest.raises(VoltError) as err:
        rt.run({"kernel": str(tmp_path / "missing")})
    assert err.value.exit_code == exitcodes.KERNEL
