"""Real Debian root filesystems (debootstrap minbase bookworm), built once and cached.

Callers get a read-only-by-convention directory; copy it before changing it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from devtools import cache

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"


def debian_rootfs(extra_packages: tuple[str, ...] = ()) -> Path:
    """A minbase bookworm tree, plus ``extra_packages``; built on first use (~1 min)."""
    name = f"rootfs-{SUITE}-" + cache.key(SUITE, MIRROR, sorted(extra_packages))
    with cache.locked(name) as target:
        done = target.with_name(target.name + ".done")
        if done.exists():
            return target
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
        if target.exists():
            shutil.rmtree(target)
        cmd = ["debootstrap", "--variant=minbase"]
        if extra_packages:
            cmd.append("--include=" + ",".join(sorted(extra_packages)))
        cmd += [SUITE, str(target), MIRROR]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(target, ignore_errors=True)
            raise RuntimeError(f"debootstrap failed ({proc.returncode}): {proc.stderr[-2000:]}")
        # Logs and caches differ run to run; drop them so rebuilt trees compare equal.
        for sub in ("var/cache/apt/archives", "var/log"):
            p = target / sub
            for child in p.glob("*.deb") if sub.endswith("archives") else p.glob("*.log"):
                child.unlink()
        done.touch()
        return target
