"""virtio-net on a real tap of this host (root and /dev/net/tun): a ping from the
"guest" is answered by the host kernel through the device, and every bad tap, MAC or
address is refused before a guest could run, with a message that says why."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator

import pytest
from stellarium_virtio_net.device import RX, TX
from stellarium_virtio_net.plugin import open_device
from stellarium_virtio_net.tap import IFF_NO_PI, IFF_TAP, TUNSETIFF, VNET_HDR

from devtools.virtio_rings import Rig
from stellarium_core.errors import ConfigError

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun to create taps")

GUEST_MAC = bytes.fromhex("52540000ab01")
GUEST_IP, HOST_IP = bytes([10, 213, 0, 2]), bytes([10, 213, 0, 1])


def _ipr():
    from pyroute2 import IPRoute
    return IPRoute()


@pytest.fixture
def tapname(request) -> Iterator[str]:
    name = f"vt{os.getpid() % 10000}{request.node.name[-4:]}"[:15]
    yield name
    with _ipr() as ipr:
        for idx in ipr.link_lookup(ifname=name):
            ipr.link("del", index=idx)


def persistent_tap(name: str) -> None:
    with _ipr() as ipr:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_request(dst_mac: bytes, ident: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, GUEST_IP, HOST_IP)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + icmp


def test_the_host_kernel_answers_a_ping_through_the_device(tapname):
    dev = open_device(tapname, mac=GUEST_MAC.hex(":"), host_ip="10.213.0.1/24")
    rig = Rig(dev)
    try:
        with _ipr() as ipr:
            idx = ipr.link_lookup(ifname=tapname)[0]
            link = ipr.get_links(idx)[0]
            assert link["flags"] & 1, "the tap is up"
            host_mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
            assert any(a.get_attr("IFA_ADDRESS") == "10.213.0.1"
                       for a in ipr.get_addr(index=idx))
            ipr.neigh("add", dst="10.213.0.2", lladdr=GUEST_MAC.hex(":"), ifindex=idx,
                      state=0x80)                # NUD_PERMANENT: no ARP round needed
        rx = rig.rings[RX]
        bufs = [rx.add([(2048, True)])[1][0] for _ in range(8)]
        rig.kick(RX)
        rig.rings[TX].add([(bytes(VNET_HDR) + echo_request(host_mac, 0x4242, b"volt" * 8),
                            False)])
        rig.kick(TX)
        replies: list[bytes] = []

        def answered() -> bool:
            for head, n in rx.used():
                f = rx.read(bufs[head], n)[VNET_HDR:]
                if f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0:   # ICMP echo reply
                    replies.append(f)
            return bool(replies)
        rig.settle(answered)
        r = replies[0]
        assert r[:6] == GUEST_MAC and r[26:30] == HOST_IP and r[30:34] == GUEST_IP
        assert struct.unpack("!H", r[38:40])[0] == 0x4242 and r[42:74] == b"volt" * 8
        m = dev.metrics()
        assert m["tx_packets"] >= 1 and m["rx_packets"] >= 1 and m["tx_errors"] == 0
    finally:
        rig.close()


def test_an_existing_tap_that_is_down_is_refused(tapname):
    persistent_tap(tapname)
    with pytest.raises(ConfigError, match=f"tap {tapname} exists but is down"):
        open_device(tapname)
    dev = open_device(tapname, host_ip="10.214.0.1/24")     # asked to configure it: fine
    dev.close()


def test_a_tap_another_process_holds_is_refused(tapname):
    persistent_tap(tapname)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tapname.encode(), IFF_TAP | IFF_NO_PI))
        with pytest.raises(ConfigError, match="in use by another process"):
            open_device(tapname, host_ip="10.215.0.1/24")
    finally:
        os.close(fd)


def test_a_mac_a_host_interface_has_is_refused(tapname):
    persistent_tap(tapname)
    with _ipr() as ipr:
        mac = ipr.get_links(ipr.link_lookup(ifname=tapname)[0])[0].get_attr("IFLA_ADDRESS")
    with pytest.raises(ConfigError, match=f"MAC {mac} is already used by host interface "
                                          f"{tapname}"):
        open_device("vtbad", mac=mac, host_ip="10.216.0.1/24")
    with _ipr() as ipr:
        assert not ipr.link_lookup(ifname="vtbad")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tap": "lo"}, "lo exists and is not a tap device"),
    ({"tap": "x" * 16}, "is not an interface name"),
    ({"tap": "vtbad", "mac": "01:00:5e:00:00:01"}, "multicast or zero"),
    ({"tap": "vtbad", "mac": "52:54:00:zz:00:01"}, "is not a MAC address"),
    ({"tap": "vtbad", "host_ip": "10.0.0.1"}, "needs a prefix length"),
    ({"tap": "vtbad", "bridge": "no-such-br0"}, "bridge 'no-such-br0' does not exist"),
])
def test_bad_parameters_are_clear_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        open_device(**kwargs)
    with _ipr() as ipr:
        assert not ipr.link_lookup(ifname="vtbad"), "a refused device left a tap behind"


def test_vhost_without_the_module_is_a_clear_error(tapname):
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("this host has /dev/vhost-net; the lab test covers vhost=on")
    with pytest.raises(ConfigError, match="cannot open /dev/vhost-net.*modprobe vhost_net"):
        open_device(tapname, vhost=True)
