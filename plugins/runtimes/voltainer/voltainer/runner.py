"""``voltainer run``: FUSE view + overlay + systemd-nspawn, torn down on every exit path.

The host has no systemd or D-Bus, so nspawn runs with ``--register=no
--keep-unit``. The FUSE server and nspawn get PR_SET_PDEATHSIG, so if the runner
is killed they follow it (nspawn then kills the container) and only mounts
remain, which ``voltainer gc`` or the next run removes.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from stellarium_core.distribution import ImageStore
from stellarium_core.errors import StellarError, UsageError
from stellarium_core.host import Host
from voltainer import mounts
from voltainer.mounts import Proc, State

NSPAWN = "systemd-nspawn"
_PR_SET_PDEATHSIG = 1
_MOUNT_WAIT = 60.0


class RunError(StellarError):
    """The container could not be set up; nothing is left mounted."""


def runtime_dir(host: Host) -> Path:
    return host.store_path / "runtime"


def _die_with_parent() -> None:
    """preexec: get SIGTERM when the runner dies (nspawn then stops the container)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _wait_mounted(d: Path, proc: subprocess.Popen[Any], log: Path) -> None:
    lower = os.path.realpath(d / "lower")
    deadline = time.monotonic() + _MOUNT_WAIT
    while time.monotonic() < deadline:
        if lower in mounts.mounts_under(d):
            return
        if proc.poll() is not None:
            raise RunError(f"the FUSE view did not mount: {log.read_text().strip()[-800:]}")
        time.sleep(0.05)
    raise RunError(f"the FUSE view did not mount within {_MOUNT_WAIT:g} s")


def nspawn_command(root: Path, cid: str, command: list[str], *,
                   private_network: bool) -> list[str]:
    cmd = [NSPAWN, "-q", "--register=no", "--keep-unit", f"--directory={root}",
           f"--machine={cid}", "--link-journal=no"]
    if private_network:
        cmd.append("--private-network")
    return [*cmd, "--", *command]


def run(host: Host, image: str, command: list[str], *, private_network: bool = False,
        config: str | None = None) -> int:
    """Run ``command`` in a container of ``image``; returns the command's exit code."""
    if not command:
        raise UsageError("no command given (voltainer run IMAGE -- CMD [ARGS...])")
    if shutil.which(NSPAWN) is None:
        raise RunError("systemd-nspawn is not installed (apt-get install systemd-container)")
    runtime = runtime_dir(host)
    runtime.mkdir(parents=True, exist_ok=True)
    mounts.gc(runtime)
    images = ImageStore(host.store_path / "images", host.store, host.hasher)
    digest = images.resolve(image)
    cid = "vt-" + re.sub(r"[^a-z0-9-]", "-", image.lower())[:24].strip("-") + "-" + \
        secrets.token_hex(4)
    d = runtime / cid
    for sub in ("lower", "upper", "work", "root"):
        (d / sub).mkdir(parents=True)
    state = State(cid, image, digest.hex(), Proc.of(os.getpid()))
    state.save(d)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        log = d / "fuse.log"
        with open(log, "wb") as logfh:
            fuse = subprocess.Popen(
                [sys.executable, "-m", "voltainer.serve",
                 *(["--config", str(config)] if config else []), digest.hex(), str(d / "lower")],
                stdin=subprocess.DEVNULL, stdout=logfh, stderr=logfh,
                preexec_fn=_die_with_parent)
        state.fuse = Proc.of(fuse.pid)
        state.save(d)
        _wait_mounted(d, fuse, log)
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={d / 'lower'},upperdir={d / 'upper'},"
                            f"workdir={d / 'work'}", str(d / "root")],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RunError(f"mounting the overlay failed: {r.stderr.strip()}")
        ns = subprocess.Popen(nspawn_command(d / "root", cid, command,
                                             private_network=private_network),
                              preexec_fn=_die_with_parent)
        state.nspawn = Proc.of(ns.pid)
        state.save(d)
        while True:
            try:
                return ns.wait()
            except KeyboardInterrupt:  # nspawn got the SIGINT too; wait for it to finish
                continue
    finally:
        signal.signal(signal.SIGTERM, old_term)
        mounts.cleanup(d, state)
