"""``volt run``: boot a microVM and attach its serial console to this terminal.

Only parsing lives here: the flags come from the VmConfig schema, a config file
(``--config-file``) and the host config's [vm] table fill what they leave out, and
:func:`volt.api.launch` does the rest (with ``--api-sock``, serving Firecracker's API).
"""

from __future__ import annotations

import argparse

from volt import api
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
    api.add_arguments(p)
    confine.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return api.launch(args)
