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
    """Where container state dirs live: ``<store>/runtime`` (see :mod:`voltainer.mounts`)."""
    return host.store_path / "runtime"


def _die_with_parent() -> None:
    """preexec: get SIGTERM when the runner dies (nspawn then stops the container)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _into_cgroup(cgroup: str | None) -> Any:
    """preexec for nspawn: die with the runner, and join the container's cgroup."""
    def pre() -> None:
        _die_with_parent()
        if cgroup:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
    return pre


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


PIN = "voltainer/"


def image_command(config: dict[str, Any]) -> list[str]:
    """The image's default command: OCI ``Entrypoint`` + ``Cmd``, each a list of strings.

    A config from an untrusted image may hold anything; a string here would
    otherwise be split into characters, so it is refused.
    """
    out: list[str] = []
    for key in ("Entrypoint", "Cmd"):
        value = config.get(key) or []
        if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
            raise RunError(f"the image's {key} is not a list of strings: {value!r:.80}")
        out += value
    return out


def nspawn_command(root: Path, cid: str, command: list[str], *, private_network: bool,
                   config: dict[str, Any]) -> list[str]:
    """The nspawn line; the image's OCI config supplies Env and WorkingDir."""
    cmd = [NSPAWN, "-q", "--register=no", "--keep-unit", f"--directory={root}",
           f"--machine={cid}", "--link-journal=no"]
    cmd += [f"--setenv={e}" for e in config.get("Env", []) if isinstance(e, str) and "=" in e]
    if isinstance(config.get("WorkingDir"), str) and config["WorkingDir"].startswith("/"):
        cmd.append(f"--chdir={config['WorkingDir']}")
    if private_network:
        cmd.append("--private-network")
    return [*cmd, "--", *command]


def gc(host: Host) -> list[str]:
    """Clean up crashed runs and drop the image pins of containers that are gone."""
    runtime = runtime_dir(host)
    cleaned = mounts.gc(runtime)
    images = ImageStore.for_host(host)
    for name in images.index():
        if name.startswith(PIN) and not (runtime / name[len(PIN):]).exists():
            images.remove(name)
    return cleaned


def run(host: Host, image: str, command: list[str], *, private_network: bool = False,
        config: str | None = None) -> int:
    """Run ``command`` in a container of ``image``; returns the command's exit code.

    Plugins hear ``stellarium_instance_started`` once the container's nspawn is
    running and ``stellarium_instance_stopped`` with its exit code.
    """
    if shutil.which(NSPAWN) is None:
        raise RunError("systemd-nspawn is not installed (apt-get install systemd-container)")
    runtime = runtime_dir(host)
    runtime.mkdir(parents=True, exist_ok=True)
    gc(host)
    images = ImageStore.for_host(host)
    digest = images.resolve(image)
    manifest = images.image(digest)
    command = command or image_command(manifest.config)
    if not command:
        raise UsageError("no command given and the image names none "
                         "(voltainer run IMAGE -- CMD [ARGS...])")
    cid = "vt-" + re.sub(r"[^a-z0-9-]", "-", image.lower())[:24].strip("-") + "-" + \
        secrets.token_hex(4)
    d = runtime / cid
    for sub in ("lower", "upper", "work", "root"):
        (d / sub).mkdir(parents=True)
    state = State(cid, image, digest.hex(), Proc.of(os.getpid()))
    state.save(d)
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        # A name on the image keeps its layers and chunks alive while we serve them,
        # even if the user removes the image meanwhile (gc drops stale pins).
        with images.locked():
            images.bind(PIN + cid, manifest)
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
        state.cgroup = mounts.make_cgroup(cid)
        state.save(d)
        ns = subprocess.Popen(nspawn_command(d / "root", cid, command,
                                             private_network=private_network,
                                             config=manifest.config),
                              preexec_fn=_into_cgroup(state.cgroup))
        state.nspawn = Proc.of(ns.pid)
        state.save(d)
        hook = host.registry.hook
        hook.stellarium_instance_started(runtime="voltainer", instance=cid,
                                         info={"image": image, "digest": digest.hex(),
                                               "pid": ns.pid, "command": command})
        while True:
            try:
                code = ns.wait()
                break
            except KeyboardInterrupt:  # nspawn got the SIGINT too; wait for it to finish
                continue
        hook.stellarium_instance_stopped(runtime="voltainer", instance=cid, exit_code=code)
        return code
    finally:
        signal.signal(signal.SIGTERM, old_term)
        mounts.cleanup(d, state)
        if PIN + cid in images.index():
            images.remove(PIN + cid)
