"""Escape attempts from inside a confined VMM, by a hostile device plugin.

tests/plugins/escape-device is pip-installed into a target directory (only here),
and ``volt run`` boots a tiny PVH guest that drives it: the attempt runs in the
vCPU thread (a config-space read) or in the I/O thread (a queue notification
through an ioeventfd). Under the default confinement every attempt either fails
with EACCES/EPERM or kills the VMM with SIGSYS, and the kernel logs the syscall.
Under ``--seccomp=log`` the same attempts must still fail: Landlock and the
dropped capabilities hold on their own.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from volt.jail import landlock, seccomp
from volt.vmm import layout

sys.path.insert(0, str(Path(__file__).parent))
from tinyguest import kvm_unusable, make_elf  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]
VOLT = str(Path(sys.executable).with_name("volt"))

pytestmark = pytest.mark.skipif(kvm_unusable() is not None, reason=str(kvm_unusable()))


def _mov(addr: int, value: int) -> bytes:
    return bytes.fromhex("c705") + struct.pack("<II", addr, value)


def escape_guest() -> bytes:
    """32-bit PVH code: accept VERSION_1, set DRIVER_OK, kick queue 0, poll config
    until the device says done, print "K" on COM1, reset through the i8042."""
    b = layout.MMIO_BASE
    code = (_mov(b + 0x24, 1) + _mov(b + 0x20, 1) + _mov(b + 0x70, 0xF) + _mov(b + 0x50, 0)
            + bytes.fromhex("a1" + struct.pack("<I", b + 0x100).hex() + "85c0" "74f7")
            + bytes.fromhex("66baf803" "b04b" "ee" "b0fe" "e664" "f4"))
    return make_elf(body=code, pvh=0x1000000)


@pytest.fixture(scope="module")
def escape(tmp_path_factory):
    """Install the escape device, write the guest, start a sibling and a TCP listener."""
    tmp = tmp_path_factory.mktemp("escape")
    site = tmp / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT / "tests" / "plugins" / "escape-device")],
        capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    kernel = tmp / "escape.elf"
    kernel.write_bytes(escape_guest())
    listener = socket.create_server(("127.0.0.1", 0))
    sibling = subprocess.Popen(["sleep", "600"])
    mem = Path("/dev/mem")
    if not mem.exists():                     # this host has none: make the same node
        mem = tmp / "mem"
        os.mknod(mem, 0o600 | 0o020000, os.makedev(1, 1))
    mountpoint = tmp / "mnt"
    mountpoint.mkdir()
    yield {"site": site, "kernel": kernel, "port": listener.getsockname()[1],
           "pid": sibling.pid, "outside": tmp / "outside", "mem": mem, "mnt": mountpoint}
    sibling.kill()
    sibling.wait()
    listener.close()


def run_attempt(escape, attempt: str, thread: str, *opts: str) -> subprocess.CompletedProcess:
    """``volt run`` with the escape device; ``.pid`` is the VMM's pid."""
    path = {"write-outside": escape["outside"], "open-dev-mem": escape["mem"],
            "mount": escape["mnt"]}.get(attempt, "")
    dev = (f"escape-device,attempt={attempt},thread={thread},port={escape['port']},"
           f"pid={escape['pid']},path={path}")
    cmd = [VOLT, "run", "--kernel", str(escape["kernel"]), "--mem", "32", "--serial", "none",
           "--device", dev, *opts]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(escape["site"])}) as p:
        out, err = p.communicate(timeout=120)
    res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    res.pid = p.pid
    return res


def blocked(res: subprocess.CompletedProcess, attempt: str, thread: str) -> int:
    """The errno the device reported; fails when the attempt got through."""
    assert res.returncode == 0, res.stderr
    m = re.search(rf"escape-device: {attempt} in ({thread}\d*): (blocked: errno (\d+)|SUCCEEDED)",
                  res.stderr)
    assert m, res.stderr
    assert "SUCCEEDED" not in m.group(2), f"{attempt} escaped from the {thread} thread"
    return int(m.group(3))


def kill_logged(pid: int) -> str | None:
    """The kernel's record of the kill, once it has been read out."""
    for wait in (0.0, 0.2, 1.0):
        time.sleep(wait)
        why = seccomp.explain_kill(pid)
        if why:
            return why
    return None


#: attempt -> (errno under full confinement, or the syscall seccomp kills it at)
FULL = {
    "read-shadow": errno.EACCES, "write-outside": errno.EACCES, "open-dev-mem": errno.EACCES,
    "exec-sh": "execve", "connect-tcp": "socket", "ptrace-sibling": "ptrace",
    "signal-sibling": "kill",
    "load-module": "init_module", "mount": "mount",
}


@pytest.mark.parametrize("thread", ["vcpu", "io"])
@pytest.mark.parametrize("attempt", list(FULL))
def test_escape_fails_under_default_confinement(escape, attempt, thread):
    want = FULL[attempt]
    res = run_attempt(escape, attempt, thread)
    assert "volt: confined: landlock ABI" in res.stderr and "seccomp kill" in res.stderr
    if isinstance(want, int):
        assert blocked(res, attempt, thread) == want
    else:
        assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr)
        assert "escape-device" not in res.stderr      # killed before it could report
        why = kill_logged(res.pid)
        if why is None:
            # Without auditd the kernel prints audit lines under printk's rate limit
            # (10 per 5 s) and drops the rest; the same kill once the window is over.
            time.sleep(5.5)
            res = run_attempt(escape, attempt, thread)
            assert res.returncode == -signal.SIGSYS, (res.returncode, res.stderr)
            why = kill_logged(res.pid)
        assert why and f"called {want} (" in why, why
        assert f"thread '{thread}" in why, why        # the thread's name, set by Volt
    assert not escape["outside"].exists()


@pytest.mark.parametrize("attempt", list(FULL))
def test_every_layer_holds_alone_when_seccomp_only_logs(escape, attempt):
    """--seccomp=log: Landlock and the dropped capabilities must stop everything."""
    need = {"connect-tcp": (4, "TCP rules"), "signal-sibling": (6, "signal scoping")}
    if attempt in need and landlock.abi_version() < need[attempt][0]:
        pytest.skip(f"Landlock ABI {landlock.abi_version()} has no {need[attempt][1]} "
                    f"(needs ABI {need[attempt][0]})")
    res = run_attempt(escape, attempt, "io", "--seccomp=log")
    got = blocked(res, attempt, "io")
    if attempt == "load-module" and not Path("/proc/modules").exists():
        assert got in (errno.EPERM, errno.ENOSYS)     # a kernel without module support
    else:
        want = FULL[attempt] if isinstance(FULL[attempt], int) else errno.EPERM
        if attempt in ("exec-sh", "connect-tcp"):
            want = errno.EACCES                       # Landlock: no EXECUTE, no TCP
        assert got == want, res.stderr
    assert not escape["outside"].exists()
