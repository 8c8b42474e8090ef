"""The ``virtio-net`` device plugin:
``volt run --device virtio-net,tap=NAME[,mac=..][,host_ip=CIDR][,bridge=BR][,vhost=on]``.

Firecracker's network-interfaces map onto it: ``host_dev_name`` is ``tap`` and
``guest_mac`` is ``mac``.
"""

from __future__ import annotations

from typing import Any

from stellarium_core.config import Field, validate_params
from stellarium_core.hookspecs import hookimpl
from stellarium_virtio_net.device import VirtioNet
from stellarium_virtio_net.tap import open_tap, parse_mac, random_mac
from stellarium_virtio_net.vhost import VhostNet

NAME = "virtio-net"


def open_device(tap: str, *, mac: str | None = None, host_ip: str | None = None,
                bridge: str | None = None, vhost: bool = False) -> VirtioNet:
    """A NIC on tap ``tap`` (created if missing) with guest MAC ``mac`` (random if None)."""
    guest_mac = parse_mac(mac) if mac is not None else random_mac()
    backend = VhostNet() if vhost else None
    try:
        t = open_tap(tap, host_ip=host_ip, bridge=bridge,
                     guest_mac=guest_mac if mac is not None else None)
    except BaseException:
        if backend is not None:
            backend.close()
        raise
    return VirtioNet(t, guest_mac, backend)


@hookimpl
def stellarium_device(name: str, params: dict[str, Any]) -> VirtioNet | None:
    if name != NAME:
        return None
    p = validate_params(params, {
        "tap": Field(str, doc="host tap interface (created if missing)"),
        "mac": Field(str, None, doc="guest MAC address (default: random, locally administered)"),
        "host_ip": Field(str, None, doc="address for the host side of the tap, CIDR"),
        "bridge": Field(str, None, doc="existing bridge to add the tap to"),
        "vhost": Field("flag", False, doc="serve the rings in the kernel (vhost-net)"),
    })
    return open_device(p["tap"], mac=p["mac"], host_ip=p["host_ip"], bridge=p["bridge"],
                       vhost=p["vhost"])
