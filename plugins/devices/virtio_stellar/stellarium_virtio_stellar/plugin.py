"""The ``virtio-stellar`` device plugin: ``volt run --device virtio-stellar,volume=NAME``.

It opens the named volume from the store of the host the VMM runs for (its
``--config``, handed over in the :class:`DeviceContext`) and serves it to the guest
as a standard virtio-blk disk, so an unmodified Linux ``virtio_blk`` driver reads
and writes Stellarium storage.
"""

from __future__ import annotations

from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import DeviceContext, hookimpl
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


def open_device(host: Host, volume: str, *, readonly: bool = False) -> VirtioStellar:
    """A device over ``volume`` in ``host``'s store.

    A writable device holds the volume's writer lock; its writes are flushed when
    the guest sends FLUSH and when the VMM closes the device.
    """
    vols = VolumeStore(host.store_path / "volumes", host.store, host.hasher)
    vol = vols.open(volume, readonly=readonly)
    try:
        disk = BlockDevice(vol)
    except BaseException:
        vol.close()
        raise
    return VirtioStellar(disk, serial=volume, on_close=vol.close)


@hookimpl
def stellarium_device(name: str, params: dict[str, Any],
                      context: DeviceContext) -> VirtioStellar | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "volume": Field(str, doc="volume name in the host's store"),
        "readonly": Field(object, False, doc="serve the volume read-only"),
    })
    return open_device(context.host, p["volume"], readonly=_boolean(p["readonly"]))
