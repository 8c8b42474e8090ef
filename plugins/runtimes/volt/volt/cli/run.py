"""``volt run``: boot a microVM and attach its serial console to this terminal."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

from volt.cli.timing import process_start  # imported early: its fallback clock starts here
from volt.jail import confine
from volt.vmm import exitcodes
from volt.vmm.exitcodes import VoltError

if TYPE_CHECKING:
    from volt.vmm.vm import Machine


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in exitcodes.TABLE)
    return ("exit codes:\n" + codes + "\n\nsignals: SIGTERM/SIGINT stop the VM cleanly; "
            "SIGUSR1 pauses the vCPUs, SIGUSR2 resumes them.")


DESCRIPTION = ("Boot a Linux microVM under KVM; the guest's serial console goes to stdout "
               "(or --serial).")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot a microVM from a kernel (and initrd)",
                       description=DESCRIPTION, epilog=_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``volt run`` (shared with the lean ``python -m volt.vmm`` entry)."""
    p.add_argument("--kernel", required=True, help="ELF vmlinux or bzImage")
    p.add_argument("--initrd", help="initramfs / initrd image")
    p.add_argument("--cmdline", default=None,
                   help="kernel command line (default: console=ttyS0 reboot=k panic=-1 pci=off)")
    p.add_argument("--mem", type=int, default=128, metavar="MIB", help="guest memory in MiB")
    p.add_argument("--vcpus", type=int, default=1, help="number of vCPUs")
    p.add_argument("--hugepages", action="store_true", help="back guest memory with huge pages")
    p.add_argument("--serial", default="stdout",
                   help="console output: stdout, none, file:PATH or unix:PATH")
    p.add_argument("--boot", default="auto", choices=("auto", "linux64", "pvh"),
                   help="entry: 64-bit boot protocol or PVH (auto: PVH for a vmlinux with "
                        "a PVH note, else 64-bit)")
    p.add_argument("--device", action="append", default=[], metavar="NAME[,K=V...]",
                   help="add a virtio-mmio device from an installed device plugin")
    p.add_argument("--timing", action="store_true",
                   help="print setup time (process start to first KVM_RUN) to stderr")
    confine.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volt.vmm.devices.virtio_mmio import parse_device_option
    from volt.vmm.vm import VmConfig, build

    cfg = VmConfig(kernel=args.kernel, initrd=args.initrd, mem_mib=args.mem, vcpus=args.vcpus,
                   hugepages=args.hugepages, serial=args.serial, boot=args.boot,
                   devices=[parse_device_option(d) for d in args.device])
    if args.cmdline is not None:
        cfg.cmdline = args.cmdline
    machine = build(cfg)
    confine.apply(args, cfg, machine)      # after the build, before the first guest instruction
    if cfg.serial == "stdout":
        try:
            machine.feed_console(sys.stdin.fileno())
        except (AttributeError, OSError, ValueError):
            pass          # no usable stdin (embedded, redirected away): output only
    return run_machine(machine, timing=args.timing)


def run_machine(machine: Machine, timing: bool = False) -> int:
    """Run until the guest ends or a signal stops it; returns the exit code."""
    signal.signal(signal.SIGTERM, lambda *_: machine.stop(exitcodes.TERMINATED, "SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: machine.stop(exitcodes.TERMINATED, "SIGINT"))
    signal.signal(signal.SIGUSR1, lambda *_: machine.pause())
    signal.signal(signal.SIGUSR2, lambda *_: machine.resume())
    try:
        machine.start()
        code = machine.wait()
    finally:
        machine.close()
    if timing and machine.first_run is not None:
        print(f"volt: setup {1000 * (machine.first_run - process_start()):.1f} ms "
              "(process start to first KVM_RUN)", file=sys.stderr)
    if code is None:
        raise VoltError("VM ended without an exit code")
    if code != exitcodes.OK or machine.exit_reason not in ("guest reset", "guest powered off"):
        print(f"volt: {machine.exit_reason}", file=sys.stderr)
    return code
