"""The ``virtio-vsock`` device plugin: ``volt run --device virtio-vsock,guest_cid=N,uds_path=P``
(Firecracker's vsock: ``guest_cid`` and ``uds_path``, same meaning)."""

from __future__ import annotations

from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.hookspecs import hookimpl
from stellarium_virtio_vsock.device import VirtioVsock, open_listener

NAME = "virtio-vsock"


def _cid(value: int) -> str | None:
    return None if 3 <= value < 0xFFFFFFFF else f"must be at least 3 (0-2 are reserved), " \
                                                 f"got {value}"


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioVsock | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "guest_cid": Field("number", check=_cid, doc="the guest's context id (>= 3)"),
        "uds_path": Field(str, doc="unix socket host programs connect to; guest connections "
                                   "go to UDS_PATH_PORT"),
    })
    return VirtioVsock(p["guest_cid"], p["uds_path"], open_listener(p["uds_path"]))
