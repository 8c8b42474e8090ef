"""The ``virtio-rng`` device plugin: ``volt run --device virtio-rng[,bytes_per_sec=N]``."""

from __future__ import annotations

from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import hookimpl
from stellarium_virtio_rng.device import VirtioRng

NAME = "virtio-rng"


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioRng | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "bytes_per_sec": Field("number", 0, doc="entropy per second (0: no limit)"),
    })
    if p["bytes_per_sec"] < 0:
        raise ConfigError("must be 0 (no limit) or a positive number of bytes",
                          key="bytes_per_sec")
    return VirtioRng(p["bytes_per_sec"])
