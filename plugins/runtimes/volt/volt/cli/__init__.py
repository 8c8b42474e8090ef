"""``volt``: the microVM monitor's command line."""

from __future__ import annotations

from collections.abc import Sequence

from stellarium_core.cli.common import run

#: Command modules; each adds its subcommands to ``volt``.
MODULES: tuple[str, ...] = ()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volt`` console script."""
    return run("volt", "Volt KVM microVM monitor.", MODULES, argv)
