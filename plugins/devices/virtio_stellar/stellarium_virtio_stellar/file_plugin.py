"""The ``virtio-blk`` device plugin: ``volt run --device virtio-blk,path=FILE``.

The same request logic as virtio-stellar (:class:`VirtioStellar`) over a raw
image file instead of a Stellarium volume, so a benchmark can tell the cost of
the storage apart from the cost of the device model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.hookspecs import hookimpl
from stellarium_virtio_stellar.device import ID_BYTES, VirtioStellar
from stellarium_virtio_stellar.disks import RawFileDisk
from stellarium_virtio_stellar.plugin import _boolean

NAME = "virtio-blk"


def open_device(path: str, *, readonly: bool = False, serial: str | None = None) -> VirtioStellar:
    """A device over the raw image ``path``; its serial defaults to the file name."""
    disk = RawFileDisk(path, readonly=readonly)
    return VirtioStellar(disk, serial=serial if serial is not None else Path(path).name[:ID_BYTES],
                         on_close=disk.close)


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioStellar | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "path": Field(str, doc="raw image file or block device"),
        "readonly": Field(object, False, doc="serve the file read-only"),
        "serial": Field(str, None, doc="GET_ID serial (default: the file name)"),
    })
    return open_device(p["path"], readonly=_boolean(p["readonly"]), serial=p["serial"])
