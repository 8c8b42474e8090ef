"""End to end in the lab, under Volt's default confinement: a vsock echo makes a round
trip in both directions through Firecracker's unix-socket host side."""

from __future__ import annotations

import pytest

from devtools.guest import BUSYBOX_PRELUDE, CMDLINE
from devtools.guest_tools import append_files, vsock_echo
from devtools.lab_devices import VOLT, lab_scenario

GUEST_PORT, HOST_PORT = 5000, 6000
INIT = BUSYBOX_PRELUDE + f"""
/bin/vsock-echo listen {GUEST_PORT}
/bin/vsock-echo connect 2 {HOST_PORT} hello-from-guest
reboot -f
"""


@pytest.mark.lab
def test_vsock_echo_round_trips_both_ways(lab, guest_kernel, busybox_initramfs, tmp_path):
    initrd = append_files(busybox_initramfs(INIT, tmp_path / "init.cpio"),
                          {"/bin/vsock-echo": vsock_echo()})
    uds = "/run/volt-vsock/v.sock"            # L1's own tmpfs (a socket needs a local fs)
    argv = [VOLT, "run", "--kernel", str(guest_kernel.bzimage), "--initrd", str(initrd),
            "--mem", "128", "--cmdline", CMDLINE,
            "--device", f"virtio-vsock,guest_cid=3,uds_path={uds}"]
    out = lab_scenario(lab, "vsock", {"argv": argv, "uds_path": uds, "guest_port": GUEST_PORT,
                                      "host_port": HOST_PORT})
    console = out["console"]
    assert out["exit"] == 0, (out["stderr"], console[-3000:])
    assert "seccomp kill" in out["stderr"]
    assert out.get("handshake", "").startswith("OK "), (out, console[-2000:])
    assert out.get("echo") == "hello-from-host\n", console[-2000:]
    assert out.get("host_got") == "hello-from-guest\n", console[-2000:]
    assert "VSOCK-REPLY hello-from-guest" in console, console[-2000:]
