"""``volt boot record|list|show|rm``: named boot manifests (``volt run --boot NAME``).

Parsing only: :mod:`volt.boots` records (from the kernel registry and, with
``--trace-from-boot``, a traced first boot) and :mod:`stellarium_core.boot` keeps them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.cli.common import JSON, emit, table

if TYPE_CHECKING:
    from stellarium_core.host import Host


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boot", help="boot manifests: record, list, show, remove")
    bs = p.add_subparsers(dest="boot_command", metavar="ACTION", required=True)
    r = bs.add_parser("record", parents=[JSON], help="record a boot manifest NAME (then "
                      "`volt run --boot NAME`)")
    r.add_argument("name", metavar="NAME")
    r.add_argument("--kernel", required=True, metavar="NAME|HASH",
                   help="a kernel from `volt kernel list` (bzImage preferred)")
    r.add_argument("--initrd", metavar="NAME|HASH", help="an initrd from `volt kernel list`")
    root = r.add_mutually_exclusive_group(required=True)
    root.add_argument("--volume", help="root disk: a volume (virtio-stellar volume=)")
    root.add_argument("--image", help="root disk: an image's VM form, read-only "
                      "(virtio-stellar image=)")
    r.add_argument("--cmdline", default="", help="kernel command line (default: volt run's)")
    r.add_argument("--mem", type=int, default=128, metavar="MIB", help="memory (MiB)")
    r.add_argument("--vcpus", type=int, default=1)
    pf = r.add_mutually_exclusive_group()
    pf.add_argument("--trace-from-boot", action="store_true",
                    help="boot it once (`volt run --boot NAME`, until the guest powers off) "
                         "and record the chunks its disk read, in order, as its prefetch set")
    pf.add_argument("--prefetch-from", type=Path, metavar="FILE",
                    help="take the prefetch set from a `volt run --trace-chunks FILE` trace")
    r.add_argument("--run-args", default="", metavar="'ARGS'",
                   help="with --trace-from-boot: more `volt run` options for the traced "
                        "boot, as one shell-quoted string (e.g. '--serial none')")
    r.set_defaults(func=_record)
    ls = bs.add_parser("list", parents=[JSON], help="recorded boot manifests")
    ls.set_defaults(func=_list)
    s = bs.add_parser("show", parents=[JSON], help="one manifest (by name or digest prefix)")
    s.add_argument("ref", metavar="NAME|HASH")
    s.set_defaults(func=_show)
    rm = bs.add_parser("rm", parents=[JSON], help="remove a name (releases its chunks)")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=_rm)


def _host(args: argparse.Namespace) -> Host:
    from stellarium_core.host import Host

    return Host.from_config(args.config)


def _record(args: argparse.Namespace) -> int:
    from stellarium_core.errors import UsageError
    from volt import boots

    run_args = shlex.split(args.run_args)
    if run_args and not args.trace_from_boot:
        raise UsageError("--run-args is for the traced boot: add --trace-from-boot")
    host = _host(args)
    spec: dict[str, Any] = dict(
        kernel=args.kernel, initrd=args.initrd,
        root_kind="volume" if args.volume else "image", root=args.volume or args.image,
        cmdline=args.cmdline, memory_mib=args.mem, vcpus=args.vcpus)
    prefetch = boots.read_trace(args.prefetch_from) if args.prefetch_from else ()
    rec = boots.record(host, args.name, prefetch=prefetch, **spec)
    if args.trace_from_boot:
        prefetch = boots.trace_boot(args.config, args.name, run_args)
        rec = boots.record(host, args.name, prefetch=prefetch, **spec)
    emit(args, rec.summary(), lambda d: f"recorded {d['name']} ({d['digest'][:16]}, "
                                        f"prefetch {d['prefetch']} chunks)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from stellarium_core import boot

    rows = [r.summary() for r in boot.list_manifests(_host(args))]
    emit(args, rows, lambda rs: table(
        [(r["name"], r["digest"][:16], r["kernel"][:12],
          " ".join(f"{k}={v}" for k, v in r["root"].items()), r["memory_mib"], r["vcpus"],
          r["prefetch"]) for r in rs],
        ["NAME", "DIGEST", "KERNEL", "ROOT", "MIB", "VCPUS", "PREFETCH"])
        if rs else "no boot manifests recorded")
    return 0


def _show(args: argparse.Namespace) -> int:
    from stellarium_core import boot

    d = boot.load(_host(args), args.ref).summary()
    emit(args, d, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def _rm(args: argparse.Namespace) -> int:
    from stellarium_core import boot

    digest = boot.remove(_host(args), args.name)
    emit(args, {"removed": args.name, "digest": digest}, f"removed {args.name}")
    return 0
