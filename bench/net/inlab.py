"""Runs inside the lab (L1): iperf3 and a flood ping in an L2 guest under each VMM, the
host side (iperf3 server, the tap's address) here, timed from L1's clock.

Prints one JSON object: {"systems": {name: {"lines": [[seconds, text], ...], "exit": rc,
"stderr": tail}}, "errors": [...]}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from devtools.lab_vm import run_vm, wait_for  # noqa: E402

TAP, HOST_IP = "btap0", "10.0.3.1"
GUEST_MIB = 512
CMDLINE = "console=ttyS0 panic=-1 quiet"


def configure_tap_when_it_appears() -> None:
    """QEMU creates its tap but leaves it unconfigured (script=no): do what Volt's
    host_ip= does, here with busybox ip."""
    if wait_for(f"/sys/class/net/{TAP}", 120):
        subprocess.run(["busybox", "ip", "addr", "add", f"{HOST_IP}/24", "dev", TAP])
        subprocess.run(["busybox", "ip", "link", "set", TAP, "up"])


def main() -> int:
    volt, kernel, initrd, timeout = sys.argv[1:5]
    t = float(timeout)
    iperf = subprocess.Popen(["iperf3", "-s"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    base_volt = [volt, "run", "--kernel", kernel, "--initrd", initrd, "--mem", str(GUEST_MIB),
                 "--cmdline", CMDLINE + " reboot=k pci=off"]
    net = f"virtio-net,tap={TAP},host_ip={HOST_IP}/24,mac=52:54:00:12:34:56"
    systems = {
        "volt-net": base_volt + ["--device", net],
        "volt-vhost": base_volt + ["--device", net + ",vhost=on"],
        "qemu-microvm": [
            # acpi=off: the guest kernel has no ACPI, so QEMU names its virtio-mmio
            # devices on the command line (as Volt does); modern virtio as Volt's
            "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            "-enable-kvm", "-cpu", "host", "-m", str(GUEST_MIB), "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false",
            "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE + " reboot=t",
            "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=on",
            "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"],
    }
    out: dict = {"systems": {}, "errors": []}
    try:
        for name, argv in systems.items():
            while Path(f"/sys/class/net/{TAP}").exists():      # the last VMM's tap is gone
                time.sleep(0.1)
            helper = None
            if name.startswith("qemu"):
                helper = threading.Thread(target=configure_tap_when_it_appears, daemon=True)
                helper.start()
            res = run_vm(argv, t)
            out["systems"][name] = res
            if res["exit"] != 0:
                out["errors"].append(f"{name} exited {res['exit']}: {res['stderr'][-800:]}")
            print(f"{name} done", file=sys.stderr, flush=True)
    finally:
        iperf.kill()
        iperf.wait()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
