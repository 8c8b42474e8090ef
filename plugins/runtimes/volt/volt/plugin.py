"""Volt as a Stellarium runtime plugin: ``Registry().create("runtime", "volt")``.

``run(spec)`` boots a microVM from a mapping with the same fields as
:class:`volt.vmm.vm.VmConfig` (``kernel`` required) and returns the ``volt run``
exit code. Parameters given at creation are defaults for every spec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import hookimpl
from volt.vmm.vm import VmConfig

_FIELDS = {f.name for f in fields(VmConfig)}


class VoltRuntime:
    """The KVM microVM runtime."""

    name = "volt"

    def __init__(self, defaults: Mapping[str, Any]) -> None:
        unknown = set(defaults) - _FIELDS
        if unknown:
            raise ConfigError(f"unknown parameter; known: {', '.join(sorted(_FIELDS))}",
                              key=sorted(unknown)[0])
        self.defaults = dict(defaults)

    def config(self, spec: Mapping[str, Any]) -> VmConfig:
        merged = {**self.defaults, **spec}
        unknown = set(merged) - _FIELDS
        if unknown:
            raise ConfigError(f"unknown VM spec field {sorted(unknown)[0]!r}")
        if "kernel" not in merged:
            raise ConfigError("a VM spec needs a kernel", key="kernel")
        return VmConfig(**merged)

    def run(self, spec: Mapping[str, Any]) -> int:
        from volt.cli.run import run_machine
        from volt.vmm.vm import build

        return run_machine(build(self.config(spec)))


@hookimpl
def stellarium_runtime(name: str, params: dict[str, Any]) -> VoltRuntime | None:
    return VoltRuntime(params) if name == "volt" else None
