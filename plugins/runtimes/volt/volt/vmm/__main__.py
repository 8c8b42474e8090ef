"""``python -m volt.vmm``: the VMM alone, same options and exit codes as ``volt run``.

It loads only the VMM (and its API), not every ``volt`` subcommand, so it starts
faster and holds less memory; it is what a jailer (or a benchmark of the VMM) executes.
"""

from __future__ import annotations  # noqa: I001  (volt.vmm.timing first: see there)

import volt.vmm.timing  # noqa: F401  (its import ends the interpreter phase of --timing)
import argparse
import sys

from stellarium_core.errors import StellarError
from volt import api
from volt.jail import confine
from volt.vmm import config, exitcodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="volt-vmm", epilog=exitcodes.epilog(),
                                     description="Boot a Linux microVM under KVM.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH", help="host config (default: "
                        "$STELLAR_CONFIG, then ~/.config/stellarium/host.toml)")
    config.add_arguments(parser)
    api.add_arguments(parser)
    confine.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return api.launch(args)
    except StellarError as exc:
        print(f"volt-vmm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
