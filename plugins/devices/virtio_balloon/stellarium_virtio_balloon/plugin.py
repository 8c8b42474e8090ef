"""The ``virtio-balloon`` device plugin: ``volt run --device virtio-balloon,amount_mib=N``
(also ``deflate_on_oom=on``, ``stats_polling_interval_s=S``)."""

from __future__ import annotations

from typing import Any

from stellarium_core.config import Field, at_least, validate_params
from stellarium_core.hookspecs import hookimpl
from stellarium_virtio_balloon.device import MAX_MIB, VirtioBalloon

NAME = "virtio-balloon"


def _mib(value: int) -> str | None:
    return None if 0 <= value <= MAX_MIB else f"must be between 0 and {MAX_MIB}, got {value}"


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioBalloon | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "amount_mib": Field("number", 0, _mib, doc="balloon target in MiB"),
        "deflate_on_oom": Field("flag", False, doc="let the guest deflate when it runs out"),
        "stats_polling_interval_s": Field("number", 0, at_least(0),
                                          doc="statistics refresh period (0: none)"),
    })
    return VirtioBalloon(p["amount_mib"], deflate_on_oom=p["deflate_on_oom"],
                         stats_polling_interval_s=p["stats_polling_interval_s"])
