"""Small helpers for tests that drive the real command-line tools."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_cli(
    args: Sequence[str | os.PathLike[str]],
    *,
    tool: str = "stellarium_core",
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <tool> ARGS`` in a subprocess, as a user would run the CLI."""
    full_env = dict(os.environ)
    full_env.pop("STELLAR_CONFIG", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", tool, *map(str, args)],
        capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout,
    )
