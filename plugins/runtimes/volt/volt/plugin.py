"""Volt as a Stellarium runtime plugin: ``Registry().create("runtime", "volt", params)``.

``params`` are VmConfig defaults (the host config's [vm] table is exactly that);
``run(spec)`` boots a microVM from a spec with the same fields, plus ``config``
(the host config path whose store and plugins the VM uses), and returns the
``volt run`` exit code. Plugins loaded in that host hear the instance events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stellarium_core.hookspecs import hookimpl
from volt.vmm.config import Layer, VmConfig, check, layered


class VoltRuntime:
    """The KVM microVM runtime."""

    name = "volt"

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._given = check(params)            # ConfigErrors keyed by the field name
        self._defaults = layered(Layer(self._given, "spec"))

    @property
    def params(self) -> dict[str, Any]:
        """The effective defaults, every field filled in (TOML-shaped)."""
        return self._defaults.to_dict()

    def config(self, spec: Mapping[str, Any]) -> VmConfig:
        """The VmConfig for ``spec`` over this runtime's defaults."""
        return layered(Layer(self._given, "spec"), Layer(spec, "spec"))

    def run(self, spec: Mapping[str, Any]) -> int:
        from stellarium_core.host import Host
        from volt.vmm.runner import launch

        rest = dict(spec)
        host = Host.from_config(rest.pop("config", None))
        return launch(self.config(rest), host)


@hookimpl
def stellarium_runtime(name: str, params: dict[str, Any]) -> VoltRuntime | None:
    return VoltRuntime(params) if name == "volt" else None
