"""``python -m volt.vmm``: the VMM alone, same options and exit codes as ``volt run``.

It loads only the VMM (and its API), not every ``volt`` subcommand, so it starts
faster and holds less memory; it is what a jailer (or a benchmark of the VMM) executes.
"""

from __future__ import annotations  # noqa: I001  (volt.vmm.timing first: see there)

import volt.vmm.timing  # noqa: F401  (its import ends the interpreter phase of --timing)
import argparse
import functools
import sys

from stellarium_core.errors import StellarError
from volt import api
from volt.jail import confine
from volt.vmm import config, exitcodes


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The command line's parser, built once: ``volt serve`` builds it before forking, so
    its VMs share it instead of each building its own (0.7 MiB of each VM's pages)."""
    p = argparse.ArgumentParser(prog="volt-vmm", epilog=exitcodes.epilog(),
                                description="Boot a Linux microVM under KVM.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help="host config (default: "
                   "$STELLAR_CONFIG, then ~/.config/stellarium/host.toml)")
    config.add_arguments(p)
    api.add_arguments(p)
    confine.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return api.launch(args)
    except StellarError as exc:
        print(f"volt-vmm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
