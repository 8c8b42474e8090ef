"""The ``voltainer`` entry point in ``stellarium.runtimes``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stellarium_core.config import validate_params
from stellarium_core.hookspecs import hookimpl


class VoltainerRuntime:
    """Runs ``{"image", "command", "private_network"?, "config"?}``; returns the exit code."""

    name = "voltainer"

    def __init__(self, params: dict[str, Any]) -> None:
        # No parameters yet: a key in [runtime params] is a typo, reported as such.
        self.params = validate_params(params, {})

    def run(self, spec: Mapping[str, Any]) -> int:
        from stellarium_core.host import Host
        from voltainer.runner import run

        host = Host.from_config(spec.get("config"))
        return run(host, spec["image"], list(spec["command"]),
                   private_network=bool(spec.get("private_network", False)),
                   config=spec.get("config"))


@hookimpl
def stellarium_runtime(name: str, params: dict[str, Any]) -> VoltainerRuntime | None:
    return VoltainerRuntime(params) if name == "voltainer" else None
