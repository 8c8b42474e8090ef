"""Small helpers for tests that drive the real command-line tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def run_cli(
    args: Sequence[str | os.PathLike[str]],
    *,
    tool: str = "stellarium_core",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run ``python -m <tool> ARGS`` in a subprocess, as a user would run the CLI.

    ``text=False`` keeps stdout and stderr as bytes (e.g. ``stellar cat``).
    """
    full_env = dict(os.environ)
    full_env.pop("STELLAR_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", tool, *map(str, args)],
        capture_output=True, text=text, env=full_env, cwd=cwd, timeout=timeout,
    )


def new_store(directory: Path, config: str = '[store]\npath = "store"\n') -> Path:
    """Write ``<directory>/host.toml`` and run ``stellar host init``; the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "host.toml"
    cfg.write_text(config)
    r = run_cli(["--config", cfg, "host", "init"])
    assert r.returncode == 0, r.stderr
    return cfg


def stellar_json(cfg: Path, *args: object, timeout: float = 120) -> Any:
    """``stellar --config CFG ARGS --json``, asserted to succeed; its parsed output."""
    r = run_cli(["--config", cfg, *map(str, args), "--json"], timeout=timeout)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``mnt`` (created), unmounted afterwards; skips
    the test, saying why, where mounting is not allowed (it needs root)."""
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
