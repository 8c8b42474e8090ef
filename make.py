#!/usr/bin/env python3
"""Set up a fresh Debian 12 machine and run the project: ``demo`` or ``test``.

Needs only python3 and root. It installs the Debian packages the project
drives (QEMU, casync, borg, debootstrap, systemd-nspawn, nginx, the kernel
source...), creates ``.venv`` with tox, and runs the matching tox env, which
installs the core and every plugin. Extra arguments go to that env.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
APT_PACKAGES = [
    "python3-venv", "python3-dev", "gcc", "make", "git",
    "qemu-system-x86", "qemu-utils", "casync", "borgbackup", "debootstrap",
    "systemd-container", "busybox-static", "cpio", "xz-utils", "zstd", "kmod",
    "linux-source-6.1", "linux-image-amd64", "bc", "bison", "flex", "libelf-dev",
    "libssl-dev", "nginx", "erofs-utils", "squashfs-tools", "fuse3", "e2fsprogs",
    "rsync",  # a second opinion in the rootfs round-trip test
    "libfuse2",  # Voltainer's FUSE view (fusepy loads it through ctypes)
    "libseccomp2",  # Volt's seccomp filters (pyseccomp loads it through ctypes)
    "iperf3",  # bench/net: the host side of the guest's throughput runs
]
ENVS = {"demo": "demo", "test": "test", "lint": "lint", "bench": "bench"}


def missing_packages(names: list[str]) -> list[str]:
    """Debian packages from ``names`` that are not installed."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\\n", *names],
                         capture_output=True, text=True).stdout
    have = {line.split()[0] for line in out.splitlines() if line.endswith("install ok installed")}
    return [n for n in names if n not in have]


def ensure_apt() -> None:
    if shutil.which("dpkg-query") is None:
        print("make.py: not a Debian machine; install the packages in APT_PACKAGES yourself")
        return
    need = missing_packages(APT_PACKAGES)
    if not need:
        return
    if os.geteuid() != 0:
        sys.exit(f"make.py: run as root to install: {' '.join(need)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"make.py: apt-get install {' '.join(need)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *need],
                   check=True, env=env)


def ensure_tox() -> Path:
    tox = VENV / "bin" / "tox"
    if not tox.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "tox>=4"], check=True)
    return tox


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ENVS:
        print(f"usage: python3 make.py {{{'|'.join(ENVS)}}} [ARGS...]", file=sys.stderr)
        return 2
    ensure_apt()
    tox = ensure_tox()
    cmd = [str(tox), "run", "-e", ENVS[argv[0]]]
    if argv[1:]:
        cmd += ["--", *argv[1:]]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
