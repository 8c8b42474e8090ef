"""``python -m volt.vmm``: the VMM alone, same options and exit codes as ``volt run``.

It loads only the VMM, not every ``volt`` subcommand, so it starts faster and
holds less memory; it is what a jailer (or a benchmark of the VMM) executes.
"""

from __future__ import annotations

import argparse
import sys

from stellarium_core.errors import StellarError
from volt.cli import run as run_cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="volt-vmm", description=run_cmd.DESCRIPTION,
                                     epilog=run_cmd._epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run_cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cmd.run(args)
    except StellarError as exc:
        print(f"volt-vmm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
