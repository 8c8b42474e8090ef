"""``stellar``: the storage command line."""

from __future__ import annotations

from collections.abc import Sequence

from stellarium_core.cli.common import run

#: Command modules; each adds its subcommands to ``stellar``.
MODULES = (
    "stellarium_core.cli.host",
    "stellarium_core.cli.images",
    "stellarium_core.cli.node",
    "stellarium_core.cli.plugins",
    "stellarium_core.cli.store",
    "stellarium_core.cli.tiers",
    "stellarium_core.cli.volumes",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stellar`` console script."""
    return run("stellar", "Stellarium content-addressed storage.", MODULES, argv)
