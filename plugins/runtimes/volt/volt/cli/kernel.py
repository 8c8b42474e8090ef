"""``volt kernel build|import|list|show|rm``: guest kernels, built or imported, kept in NEBULA.

The store and kernel modules load in the handlers (``_registry``), not at import:
every ``volt`` command, ``volt run`` included, builds this parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core.cli.common import JSON, emit, table

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.kernels.registry import KernelRecord


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kernel", help="guest kernels: build, import, list, show")
    ks = p.add_subparsers(dest="kernel_command", metavar="ACTION", required=True)
    b = ks.add_parser("build", parents=[JSON], help="build the minimal microVM kernel from "
                      "Debian's linux-source (cached) and register it")
    b.add_argument("--name", help="registry name (default volt-<source version>-<config hash>)")
    b.add_argument("--no-register", action="store_true",
                   help="only build into the cache; do not store in NEBULA")
    b.add_argument("--jobs", type=int, help="make -j (default: CPU count)")
    b.add_argument("--verbose", action="store_true", help="show the make output")
    b.set_defaults(func=_build)
    i = ks.add_parser("import", parents=[JSON], help="register a vmlinux or bzImage file "
                      "and/or the initrd that goes with it")
    i.add_argument("path", type=Path, nargs="?", help="the kernel image")
    i.add_argument("--initrd", type=Path, metavar="FILE", help="an initramfs to store with it")
    i.add_argument("--name", help="registry name (default: the file name)")
    i.set_defaults(func=_import)
    ls = ks.add_parser("list", parents=[JSON], help="registered kernels")
    ls.set_defaults(func=_list)
    s = ks.add_parser("show", parents=[JSON], help="one kernel's metadata (by name or digest "
                      "prefix); --verify reassembles it from NEBULA")
    s.add_argument("ref", metavar="NAME|HASH")
    s.add_argument("--verify", action="store_true", help="reassemble and check every image")
    s.add_argument("--extract", type=Path, metavar="DIR",
                   help="write the verified images into DIR")
    s.set_defaults(func=_show)
    rm = ks.add_parser("rm", parents=[JSON], help="unregister a kernel (releases its chunks)")
    rm.add_argument("ref", metavar="NAME|HASH")
    rm.set_defaults(func=_rm)
    ini = ks.add_parser("initramfs", parents=[JSON],
                        help="build the busybox smoke-boot initramfs; print its path")
    ini.set_defaults(func=_initramfs)


def _registry(args: argparse.Namespace) -> tuple[Any, Host]:
    """The kernel registry module and this command's host."""
    from stellarium_core.host import Host
    from volt.kernels import registry

    return registry, Host.from_config(args.config)


def _summary(rec: KernelRecord) -> dict[str, Any]:
    return {"name": rec.name, "version": rec.data.get("version"),
            "source": rec.data.get("source"), "formats": sorted(rec.images),
            "config_hash": rec.data.get("config_hash"),
            "digests": {k: v["digest"] for k, v in rec.images.items()}}


def _build(args: argparse.Namespace) -> int:
    from volt.kernels.build import build

    kb = build(jobs=args.jobs, quiet=not args.verbose)
    data: dict[str, Any] = {"build": kb.to_dict()}
    if not args.no_register:
        registry, host = _registry(args)
        rec = registry.register_build(host, kb, args.name)
        data["registered"] = _summary(rec)

    def human(d: dict[str, Any]) -> str:
        b = d["build"]
        lines = [f"kernel {b['kernel_release']} (source {b['source_version']}, config "
                 f"{b['fragment_hash']})", f"vmlinux: {b['vmlinux']}", f"bzImage: {b['bzimage']}"]
        if "registered" in d:
            lines.append(f"registered as {d['registered']['name']}")
        return "\n".join(lines)

    emit(args, data, human)
    return 0


def _import(args: argparse.Namespace) -> int:
    registry, host = _registry(args)
    rec = registry.import_kernel(host, args.path, args.name, args.initrd)
    emit(args, _summary(rec), lambda d: f"imported {d['name']} ({', '.join(d['formats'])}"
                                        + (f", version {d['version']})" if d["version"]
                                           else ")"))
    return 0


def _list(args: argparse.Namespace) -> int:
    registry, host = _registry(args)
    recs = [_summary(r) for r in registry.list_kernels(host)]
    emit(args, recs, lambda rs: table(
        [(r["name"], r["version"], r["source"], ",".join(r["formats"]),
          " ".join(v[:12] for v in r["digests"].values())) for r in rs],
        ["NAME", "VERSION", "SOURCE", "FORMATS", "DIGESTS"]) if rs else "no kernels registered")
    return 0


def _show(args: argparse.Namespace) -> int:
    registry, host = _registry(args)
    rec = registry.find(host, args.ref)
    data = {k: v for k, v in rec.data.items() if k != "chunks"}
    data["images"] = {k: v | {"chunks": len(rec.chunks(k))} for k, v in rec.images.items()}
    if args.verify or args.extract:
        for slot in rec.images:
            if args.extract:
                args.extract.mkdir(parents=True, exist_ok=True)
                out = registry.extract(host, rec, slot, args.extract / slot)
                data["images"][slot]["extracted"] = str(out)
            else:
                registry.read_image(host, rec, slot)
            data["images"][slot]["verified"] = True

    def human(d: dict[str, Any]) -> str:
        lines = [f"{k}: {v}" for k, v in d.items() if k != "images"]
        for slot, img in d["images"].items():
            lines.append(f"{slot}:")
            lines += [f"  {k}: {v}" for k, v in img.items()]
        return "\n".join(lines)

    emit(args, data, human)
    return 0


def _rm(args: argparse.Namespace) -> int:
    registry, host = _registry(args)
    rec = registry.remove(host, args.ref)
    emit(args, {"removed": rec.name}, f"removed {rec.name}")
    return 0


def _initramfs(args: argparse.Namespace) -> int:
    from volt.kernels.initramfs import smoke_initramfs

    path = smoke_initramfs()
    emit(args, {"initramfs": str(path)}, str(path))
    return 0
