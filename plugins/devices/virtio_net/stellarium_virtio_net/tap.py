"""The host side of a guest NIC: a tap opened by the VMM, configured with pyroute2.

The VMM attaches to the tap with TUNSETIFF on its own /dev/net/tun fd; a tap that did
not exist is created by that call and is not persistent, so it disappears with the VMM
even after a kill -9. Address, link state and bridge port are set over netlink with
pyroute2 (no ``ip`` subprocess). Frames cross the fd with a 12-byte virtio-net header
(IFF_VNET_HDR), the same header the guest's driver uses, so checksum and segmentation
offloads are done by the host kernel, not by Python.

What cannot work is refused here, before the guest runs, with one clear message: a tap
another process holds or another user owns, an existing tap left down that we were not
asked to configure, a guest MAC that a host interface already has.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from dataclasses import dataclass

from stellarium_core.errors import ConfigError

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFF_UP = 0x1
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
#: The virtio-net header of a modern device (virtio_net_hdr_mrg_rxbuf), on both sides.
VNET_HDR = 12
IFNAMSIZ = 16


def parse_mac(text: str) -> bytes:
    """``AA:BB:CC:DD:EE:FF`` as 6 bytes; a multicast or all-zero MAC is refused."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ConfigError(f"{text!r} is not a MAC address like 52:54:00:12:34:56", key="mac")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ConfigError(f"{text!r} is not a MAC address like 52:54:00:12:34:56",
                          key="mac") from None
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError(f"{text} is a multicast or zero address; a NIC needs a unicast "
                          "one", key="mac")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def random_mac() -> bytes:
    """A locally administered unicast MAC."""
    return bytes([(os.urandom(1)[0] & 0xFC) | 0x02]) + os.urandom(5)


@dataclass
class Tap:
    """An attached tap: its fd (non-blocking, IFF_VNET_HDR of 12 bytes) and name."""

    fd: int
    name: str

    def set_offload(self, flags: int) -> None:
        """What the host may hand the guest unfinished (TUN_F_*: checksum, TSO)."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tap(name: str, *, host_ip: str | None = None, bridge: str | None = None,
             guest_mac: bytes | None = None) -> Tap:
    """Attach to (or create) tap ``name`` and configure it; errors are ConfigErrors."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise ConfigError(f"{name!r} is not an interface name (1-15 characters)", key="tap")
    network = _interface(host_ip) if host_ip is not None else None
    with IPRoute() as ipr:
        existing = ipr.link_lookup(ifname=name)
        if guest_mac is not None:
            _check_mac_free(ipr, guest_mac)
        bridge_index = None
        if bridge is not None:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                raise ConfigError(f"bridge {bridge!r} does not exist", key="bridge")
            bridge_index = found[0]
        if existing and host_ip is None and bridge is None:
            link = ipr.get_links(existing[0])[0]
            if not link["flags"] & IFF_UP:
                raise ConfigError(f"tap {name} exists but is down: bring it up, or give "
                                  "host_ip= or bridge= for Volt to configure it", key="tap")
        fd = _attach(name)
        try:
            index = ipr.link_lookup(ifname=name)[0]
            if network is not None:
                try:
                    ipr.addr("add", index=index, address=str(network.ip),
                             prefixlen=network.network.prefixlen)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise ConfigError(f"cannot give {name} the address {host_ip}: "
                                          f"{os.strerror(exc.code)}", key="host_ip") from None
            if bridge_index is not None:
                ipr.link("set", index=index, master=bridge_index)
            ipr.link("set", index=index, state="up")
        except BaseException:
            os.close(fd)
            raise
    return Tap(fd, name)


def _interface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in text:
        raise ConfigError(f"{text!r} needs a prefix length, like 172.16.0.1/24", key="host_ip")
    try:
        return ipaddress.ip_interface(text)
    except ValueError as exc:
        raise ConfigError(str(exc), key="host_ip") from None


def _check_mac_free(ipr: object, mac: bytes) -> None:
    text = format_mac(mac)
    for link in ipr.get_links():            # type: ignore[attr-defined]
        if (link.get_attr("IFLA_ADDRESS") or "").lower() == text:
            raise ConfigError(f"MAC {text} is already used by host interface "
                              f"{link.get_attr('IFLA_IFNAME')}", key="mac")


def _attach(name: str) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {TUN_PATH}: {exc.strerror}", key="tap") from None
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            raise ConfigError(_why(name, exc.errno), key="tap") from None
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _why(name: str, err: int | None) -> str:
    if err == errno.EBUSY:
        return f"tap {name} is in use by another process"
    if err == errno.EPERM:
        return (f"tap {name} belongs to another user or group (TUNSETOWNER), or creating "
                "a tap needs CAP_NET_ADMIN")
    if err == errno.EINVAL:
        return f"{name} exists and is not a tap device"
    return f"cannot attach to tap {name}: {os.strerror(err or 0)}"
