"""``volt``: the microVM monitor's command line."""

from __future__ import annotations

from collections.abc import Sequence

from stellarium_core.cli import common

#: Command modules; each adds its subcommands to ``volt``.
MODULES: tuple[str, ...] = ("volt.cli.lab", "volt.cli.detect", "volt.cli.kernel",
                             "volt.cli.boot", "volt.cli.run", "volt.cli.snapshot", "volt.cli.jail",
                             "volt.cli.serve")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``volt`` console script."""
    # common.run, not a bare `run`: the `volt.cli.run` submodule would shadow that name.
    return common.run("volt", "Volt KVM microVM monitor.", MODULES, argv)
