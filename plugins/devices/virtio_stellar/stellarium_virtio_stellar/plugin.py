"""The ``virtio-stellar`` device plugin: ``volt run --device virtio-stellar,volume=NAME``.

It opens the named volume from the host's store (``config`` or the default host
config lookup) and serves it to the guest as a standard virtio-blk disk, so an
unmodified Linux ``virtio_blk`` driver reads and writes Stellarium storage.
"""

from __future__ import annotations

import atexit
from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import hookimpl
from stellarium_core.host import Host
from stellarium_core.volumes.blockdev import BlockDevice
from stellarium_core.volumes.volume import VolumeStore
from stellarium_virtio_stellar.device import VirtioStellar

NAME = "virtio-stellar"


def _boolean(value: Any) -> bool:
    """``--device`` values arrive as strings; host configs give real booleans."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"must be true or false, got {value!r}", key="readonly")


def open_device(volume: str, *, readonly: bool = False,
                config: str | None = None) -> VirtioStellar:
    """A device over ``volume`` of the host configured by ``config``.

    A writable device holds the volume's writer lock; its writes are flushed
    when the guest sends FLUSH, and at interpreter exit.
    """
    host = Host.from_config(config)
    vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
    vol = vols.open(volume, readonly=readonly)
    try:
        disk = BlockDevice(vol)
    except BaseException:
        vol.close()
        raise
    dev = VirtioStellar(disk, serial=volume, on_close=vol.close)
    atexit.register(dev.close)
    return dev


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioStellar | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "volume": Field(str, doc="volume name in the host's store"),
        "readonly": Field(object, False, doc="serve the volume read-only"),
        "config": Field(str, None, doc="host config path (default: the usual lookup)"),
    })
    return open_device(p["volume"], readonly=_boolean(p["readonly"]), config=p["config"])
