"""Run inside the lab by test_api_lab.py: Firecracker's own ways of starting a microVM, on Volt.

1. The request sequence of Firecracker's getting-started guide (docs/getting-started.md
   of v1.16.1), sent with curl over the API socket: logger, boot-source, drives/rootfs,
   network-interfaces/net1, InstanceStart; only paths differ (and no --enable-pci).
2. Firecracker's test-framework config file (tests/framework/vm_config.json), paths
   replaced, with ``--config-file``.
3. pyrecracker's FirecrackerClient, unmodified, given the socket path.
Each guest is busybox init on an ext4 root (/dev/vda); it prints READY, and each run
ends with SendCtrlAltDel, which busybox init turns into a clean reboot.

Usage: python lab_firecracker.py VOLT VMLINUX ROOTFS VM_CONFIG_JSON OUT_DIR [PYRECRACKER]
Prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

READY, CLEAN = b"VOLT-FC-READY", b"VOLT-SHUTDOWN-CLEAN"
WORK = Path("/tmp/fc")             # L1's tmpfs: unix sockets and a writable raw disk
SOCK = str(WORK / "firecracker.socket")

GETTING_STARTED = r"""
API_SOCKET="{sock}"
LOGFILE="{log}"
KERNEL="{kernel}"
KERNEL_BOOT_ARGS="console=ttyS0 reboot=k panic=1"
ROOTFS="{rootfs}"
TAP_DEV="tap0"
TAP_IP="172.16.0.1"
MASK_SHORT="/30"
FC_MAC="06:00:AC:10:00:02"
ip link del "$TAP_DEV" 2> /dev/null || true
ip tuntap add dev "$TAP_DEV" mode tap
ip addr add "${{TAP_IP}}${{MASK_SHORT}}" dev "$TAP_DEV"
ip link set dev "$TAP_DEV" up

echo "logger $(curl -X PUT --unix-socket "${{API_SOCKET}}" -w ' => %{{http_code}}' \
    --data "{{
        \"log_path\": \"${{LOGFILE}}\",
        \"level\": \"Debug\",
        \"show_level\": true,
        \"show_log_origin\": true
    }}" \
    "http://localhost/logger")"

echo "boot-source $(curl -X PUT --unix-socket "${{API_SOCKET}}" -w ' => %{{http_code}}' \
    --data "{{
        \"kernel_image_path\": \"${{KERNEL}}\",
        \"boot_args\": \"${{KERNEL_BOOT_ARGS}}\"
    }}" \
    "http://localhost/boot-source")"

echo "drives $(curl -X PUT --unix-socket "${{API_SOCKET}}" -w ' => %{{http_code}}' \
    --data "{{
        \"drive_id\": \"rootfs\",
        \"path_on_host\": \"${{ROOTFS}}\",
        \"is_root_device\": true,
        \"is_read_only\": false
    }}" \
    "http://localhost/drives/rootfs")"

echo "network-interfaces $(curl -X PUT --unix-socket "${{API_SOCKET}}" -w ' => %{{http_code}}' \
    --data "{{
        \"iface_id\": \"net1\",
        \"guest_mac\": \"$FC_MAC\",
        \"host_dev_name\": \"$TAP_DEV\"
    }}" \
    "http://localhost/network-interfaces/net1")"

sleep 0.015s

echo "actions $(curl -X PUT --unix-socket "${{API_SOCKET}}" -w ' => %{{http_code}}' \
    --data "{{
        \"action_type\": \"InstanceStart\"
    }}" \
    "http://localhost/actions")"
"""


def start_volt(volt: str, console: Path, *args: str) -> subprocess.Popen:
    if os.path.exists(SOCK):
        os.unlink(SOCK)
    proc = subprocess.Popen([volt, "run", "--api-sock", SOCK, *args], stdin=subprocess.DEVNULL,
                            stdout=open(console, "wb"), stderr=subprocess.PIPE)  # noqa: SIM115
    end = time.monotonic() + 60
    while not os.path.exists(SOCK) and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.01)
    return proc


def wait_for(console: Path, needle: bytes, proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until ``needle`` shows up on the console (L1's clock), or None."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if needle in console.read_bytes():
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def curl(*args: str) -> str:
    r = subprocess.run(["curl", "-s", "--unix-socket", SOCK, "-w", " => %{http_code}", *args],
                       capture_output=True, text=True, timeout=60)
    return r.stdout


def finish(proc: subprocess.Popen, console: Path, send: object) -> dict:
    """After READY: send Ctrl-Alt-Del (``send()``), wait for the VMM to exit by itself."""
    out: dict = {"ctrl_alt_del": send()}
    sent = time.monotonic()
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    text = console.read_bytes()
    if proc.returncode < 0:
        from volt.jail.seccomp import explain_kill

        out["killed"] = explain_kill(proc.pid)
    out.update(rc=proc.returncode, stderr=err.decode(errors="replace")[-600:],
               clean=CLEAN in text, shutdown_s=round(time.monotonic() - sent, 2),
               dmesg=[ln.decode(errors="replace").strip() for ln in text.splitlines()
                      if b"VOLT-DMESG" in ln])
    return out


def main() -> int:
    volt, kernel, rootfs_src, vm_config, out_dir = sys.argv[1:6]
    pyrecracker = sys.argv[6] if len(sys.argv) > 6 else ""
    WORK.mkdir(parents=True, exist_ok=True)
    rootfs = WORK / "rootfs.ext4"
    results: dict = {}

    # 1. The getting-started guide, with curl.
    shutil.copy(rootfs_src, rootfs)
    console, log = WORK / "guide.console", WORK / "firecracker.log"
    proc = start_volt(volt, console)
    script = GETTING_STARTED.format(sock=SOCK, log=log, kernel=kernel, rootfs=rootfs)
    steps = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300)
    lines = steps.stdout.strip().splitlines()
    started = bool(lines) and lines[-1].startswith("actions") and lines[-1].endswith("204")
    r = {"steps": lines, "ready_s": wait_for(console, READY, proc, 300) if started else None}
    r.update(finish(proc, console, lambda: curl("-X", "PUT", "--data",
                                                '{"action_type": "SendCtrlAltDel"}',
                                                "http://localhost/actions")))
    r["log_lines"] = len(log.read_text().splitlines()) if log.exists() else 0
    results["getting_started"] = r

    # 2. Firecracker's test-framework config file.
    shutil.copy(rootfs_src, rootfs)
    cfg = json.loads(Path(vm_config).read_text())
    cfg["boot-source"]["kernel_image_path"] = kernel
    cfg["drives"][0]["path_on_host"] = str(rootfs)
    (WORK / "vm_config.json").write_text(json.dumps(cfg))
    console = WORK / "config.console"
    proc = start_volt(volt, console, "--config-file", str(WORK / "vm_config.json"))
    r = {"ready_s": wait_for(console, READY, proc, 300)}
    r["machine"] = curl("http://localhost/machine-config")
    r.update(finish(proc, console, lambda: curl("-X", "PUT", "--data",
                                                '{"action_type": "SendCtrlAltDel"}',
                                                "http://localhost/actions")))
    results["config_file"] = r

    # 3. pyrecracker, a Firecracker client library from PyPI.
    if pyrecracker:
        sys.path.insert(0, pyrecracker)
        from pyrecracker import client_types as t
        from pyrecracker.client import FirecrackerClient

        shutil.copy(rootfs_src, rootfs)
        console = WORK / "client.console"
        proc = start_volt(volt, console)
        c = FirecrackerClient(SOCK)
        c.put_machine_config(t.MachineConfiguration(mem_size_mib=256, vcpu_count=2))
        c.put_boot_source(t.BootSource(kernel_image_path=kernel,
                                       boot_args="console=ttyS0 reboot=k panic=1"))
        c.put_drives(t.Drive(drive_id="rootfs", is_root_device=True, is_read_only=False,
                             path_on_host=str(rootfs)))
        c.put_actions(t.InstanceActionInfo(action_type=t.ActionType.INSTANCE_START))
        r = {"ready_s": wait_for(console, READY, proc, 300)}
        c.patch_vm(t.VM(state=t.VMState.PAUSED))
        r["paused"] = curl("http://localhost/")
        c.patch_vm(t.VM(state=t.VMState.RESUMED))
        r.update(finish(proc, console, lambda: c.put_actions(t.InstanceActionInfo(
            action_type=t.ActionType.SEND_CTRL_ALT_DEL)) or "sent"))
        results["pyrecracker"] = r
    Path(out_dir, "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
