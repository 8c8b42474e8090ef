"""End to end in the lab, under Volt's default confinement: a Linux guest's virtio-net
gets an address by DHCP from the host, pings the host and fetches a file from an HTTP
server on it; in Python and with vhost=on (the kernel serving the rings)."""

from __future__ import annotations

import hashlib
import os

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.lab_devices import VOLT, lab_scenario

HOST_IP, GUEST_IP, PORT = "10.0.2.1", "10.0.2.15", 8000
INIT = BUSYBOX_PRELUDE + f"""
cat > /etc/udhcpc.script <<'SCRIPT'
#!/bin/sh
case "$1" in bound|renew) ifconfig "$interface" "$ip" netmask "$subnet" up;; esac
SCRIPT
chmod +x /etc/udhcpc.script
ip link set eth0 up
if udhcpc -i eth0 -n -q -t 30 -T 1 -s /etc/udhcpc.script >/dev/null 2>&1; then
  echo "NET-ADDR $(ip -4 addr show eth0 | grep -o 'inet [0-9.]*')"
  ping -c 3 -W 5 {HOST_IP} >/dev/null && echo NET-PING-OK
  echo "NET-HTTP $(wget -q -O - http://{HOST_IP}:{PORT}/blob | md5sum)"
else
  echo NET-DHCP-FAILED
fi
reboot -f
"""


@pytest.mark.lab
@pytest.mark.parametrize("vhost", ["off", "on"])
def test_guest_gets_an_address_pings_and_fetches_over_http(lab, guest_kernel,
                                                           busybox_initramfs, tmp_path, vhost):
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(3 << 20)
    (www / "blob").write_bytes(blob)
    initrd = busybox_initramfs(INIT, tmp_path / "init.cpio")
    tap = f"vnet{vhost}"
    argv = [VOLT, "run", "--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd),
            "--mem", "256", "--cmdline", CMDLINE, "--device",
            f"virtio-net,tap={tap},host_ip={HOST_IP}/24,mac=52:54:00:12:34:56,vhost={vhost}"]
    out = lab_scenario(lab, "net", {"argv": argv, "tap": tap, "host_ip": HOST_IP,
                                    "guest_ip": GUEST_IP, "www": str(www), "port": PORT})
    console = out["console"]
    assert out["exit"] == 0, (out["stderr"], console[-3000:])
    assert "volt: confined: landlock" in out["stderr"] and "seccomp kill" in out["stderr"]
    assert f"NET-ADDR inet {GUEST_IP}" in console, console[-3000:]
    assert "NET-PING-OK" in console, console[-3000:]
    assert f"NET-HTTP {hashlib.md5(blob).hexdigest()}" in console, console[-3000:]
