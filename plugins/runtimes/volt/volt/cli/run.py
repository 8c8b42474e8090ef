"""``volt run``: boot a microVM and attach its serial console to this terminal.

Only parsing lives here: the flags come from the VmConfig schema, the host config's
[vm] table fills what they leave out, and :func:`volt.vmm.runner.launch` does the rest.
"""

from __future__ import annotations

import argparse

from volt.jail import confine
from volt.vmm import config, exitcodes
from volt.vmm.timing import process_start  # noqa: F401  (imported early: its clock starts)

DESCRIPTION = ("Boot a Linux microVM under KVM; the guest's serial console goes to stdout "
               "(or --serial).")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot a microVM from a kernel (and initrd)",
                       description=DESCRIPTION, epilog=exitcodes.epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(p)
    confine.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stellarium_core.host import Host
    from volt.vmm.runner import launch

    host = Host.from_config(args.config)
    return launch(config.from_args(args, host.config), host, timing=args.timing,
                  confinement=confine.from_args(args))
