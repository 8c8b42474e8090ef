"""``volt detect``: is the local /dev/kvm hardware-assisted (can it boot Linux)?"""

from __future__ import annotations

import argparse

from stellarium_core.cli.common import JSON, emit
from volt.detect import LAB_HINT, detect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", parents=[JSON],
                       help="measure whether /dev/kvm is hardware-assisted (exit 1 if not)")
    p.add_argument("--device", default="/dev/kvm", help="KVM device to probe")
    p.set_defaults(func=_detect)


def _detect(args: argparse.Namespace) -> int:
    det = detect(args.device)

    def human(_: object) -> str:
        lines = [("hardware-assisted: yes" if det.assisted else "hardware-assisted: NO"),
                 det.reason]
        if det.ns_per_iteration is not None:
            lines.append(f"calibration: {det.iterations} loop iterations in "
                         f"{det.loop_seconds * 1e3:.2f} ms (threshold {det.threshold_ns:g} ns "
                         "per iteration)")
        if not det.assisted:
            lines.append(LAB_HINT)
        return "\n".join(lines)

    emit(args, det.to_dict(), human)
    return 0 if det.assisted else 1
