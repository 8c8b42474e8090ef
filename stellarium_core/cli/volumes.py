"""``stellar vol ...`` (named TinyVol volumes) and ``stellar tree ...`` (file-tree manifests)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stellarium_core.cli.common import JSON, emit, table
from stellarium_core.config import parse_size
from stellarium_core.errors import StellarError, UsageError
from stellarium_core.host import Host
from stellarium_core.volumes import filetree
from stellarium_core.volumes.volume import VolumeStore


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vol", help="block volumes (TinyVol manifests over NEBULA)")
    vs = p.add_subparsers(dest="vol_command", metavar="ACTION", required=True)

    def add(name: str, fn: Any, help: str, *args: tuple[str, str]) -> None:
        sp = vs.add_parser(name, parents=[JSON], help=help)
        for arg, h in args:
            sp.add_argument(arg, help=h)
        sp.set_defaults(func=fn)

    add("create", _create, "create an empty sparse volume",
        ("name", "volume name"), ("size", "size, e.g. 10GiB"))
    add("import", _import, "import a raw disk image (zero chunks are not stored)",
        ("name", "new volume name"), ("image", "raw image file"))
    vs.choices["import"].add_argument(
        "--mappable", action="store_true",
        help="store the chunks raw and page-aligned, ready to be mapped into VMs (a "
             "virtio-pmem DAX base) with no copy on first use")
    add("export", _export, "export a volume as a sparse raw image",
        ("name", "volume name"), ("image", "raw image file to write"))
    add("clone", _clone, "writable copy (manifest only, no data)",
        ("source", "volume to copy"), ("name", "new volume name"))
    add("snapshot", _snapshot, "read-only copy (manifest only, no data)",
        ("source", "volume to copy"), ("name", "new volume name"))
    add("commit", _commit, "fold a volume's delta into a new shared base (ShareVol)",
        ("name", "volume name"))
    add("rm", _rm, "delete a volume and release its chunks", ("name", "volume name"))
    add("ls", _ls, "list volumes")
    add("info", _info, "show a volume's manifest facts", ("name", "volume name"))
    sv = vs.add_parser("serve", help="serve a volume to other VMMs as a vhost-user-blk disk")
    sv.add_argument("name", help="volume name")
    sv.add_argument("--vhost-user", required=True, metavar="SOCKET",
                    help="unix socket to listen on (QEMU: -chardev socket,path=SOCKET)")
    sv.add_argument("--readonly", action="store_true", help="refuse the guests' writes")
    sv.set_defaults(func=_serve)

    t = sub.add_parser("tree", help="file-tree manifests (image layers)")
    ts = t.add_subparsers(dest="tree_command", metavar="ACTION", required=True)
    cap = ts.add_parser("capture", parents=[JSON], help="store a directory tree, print its digest")
    cap.add_argument("dir", help="directory to capture")
    cap.add_argument("--no-cosmic", action="store_true",
                     help="store small files as separate chunks (no Cosmic Packs)")
    cap.add_argument("--overlay-upper", action="store_true",
                     help="DIR is an overlayfs upper dir: turn its whiteouts into OCI ones")
    cap.set_defaults(func=_capture)
    stk = ts.add_parser("stack", parents=[JSON],
                        help="merge layers bottom to top (OCI whiteouts), print the digest")
    stk.add_argument("layers", nargs="+", metavar="MANIFEST", help="digest or manifest file")
    stk.set_defaults(func=_stack)
    res = ts.add_parser("restore", parents=[JSON], help="recreate a tree from its manifest")
    res.add_argument("manifest", help="manifest digest (hex) or path to a manifest file")
    res.add_argument("dir", help="target directory (absent or empty)")
    res.set_defaults(func=_restore)


def _volumes(args: argparse.Namespace) -> tuple[Host, VolumeStore]:
    host = Host.from_config(args.config)
    return host, VolumeStore.for_host(host)


def _created(host: Host, name: str, size: int) -> None:
    host.registry.hook.stellarium_volume_created(volume=name, size=size)


def _create(args: argparse.Namespace) -> int:
    try:
        size = parse_size(args.size)
    except ValueError as exc:
        raise UsageError(f"size: {exc}") from None
    host, vols = _volumes(args)
    vols.create(args.name, size).close()
    _created(host, args.name, size)
    emit(args, {"name": args.name, "size": size}, f"created {args.name} ({size} bytes)")
    return 0


def _import(args: argparse.Namespace) -> int:
    host, vols = _volumes(args)
    if not Path(args.image).is_file():
        raise StellarError(f"{args.image} is not a file")
    with vols.import_raw(args.name, args.image, mappable=args.mappable) as v:
        size = v.size
    _created(host, args.name, size)
    info = vols.info(args.name)
    emit(args, info, f"imported {args.image} as {args.name}: {info['entries']} chunks stored")
    return 0


def _export(args: argparse.Namespace) -> int:
    _, vols = _volumes(args)
    n = vols.export_raw(args.name, args.image)
    emit(args, {"name": args.name, "image": args.image, "data_bytes": n},
         f"exported {args.name} to {args.image}")
    return 0


def _copy(args: argparse.Namespace, op: Callable[[VolumeStore, str, str], Any],
          message: str) -> int:
    """Clone or snapshot SOURCE to NAME, announce the new volume and print its facts."""
    host, vols = _volumes(args)
    op(vols, args.source, args.name)
    info = vols.info(args.name)
    _created(host, args.name, info["size"])
    emit(args, info, message)
    return 0


def _clone(args: argparse.Namespace) -> int:
    return _copy(args, VolumeStore.clone, f"cloned {args.source} to {args.name}")


def _snapshot(args: argparse.Namespace) -> int:
    return _copy(args, VolumeStore.snapshot,
                 f"snapshot {args.name} of {args.source} (read-only)")


def _commit(args: argparse.Namespace) -> int:
    _, vols = _volumes(args)
    digest = vols.commit(args.name)
    emit(args, {"name": args.name, "base": digest.hex()},
         f"{args.name} now layers on base {digest.hex()}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    _, vols = _volumes(args)
    vols.delete(args.name)
    emit(args, {"removed": args.name}, f"removed {args.name}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    _, vols = _volumes(args)
    rows = [vols.info(n) for n in vols.names()]
    emit(args, rows, lambda rs: table(
        [(r["name"], r["size"], r["entries"], (r["base"] or "-")[:16],
          "ro" if r["readonly"] else "rw") for r in rs],
        ("NAME", "SIZE", "CHUNKS", "BASE", "MODE")))
    return 0


def _info(args: argparse.Namespace) -> int:
    _, vols = _volumes(args)
    info = vols.info(args.name)
    emit(args, info, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def _trees(host: Host) -> Path:
    return host.store_path / "volumes" / "trees"


def _capture(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    with host.store.pending() as journal:  # a killed capture leaks nothing gc cannot find
        m = filetree.capture(args.dir, host.store, host.chunker, host.hasher,
                             cosmic_packs=not args.no_cosmic, overlay_upper=args.overlay_upper,
                             journal=journal)
        journal.settle()
        digest = filetree.save(m, _trees(host), host.hasher, host.store, held=True)
    fp = filetree.footprint(m, host.store)
    data = {"digest": digest.hex(), "entries": len(m),
            "manifest": str(_trees(host) / f"{digest.hex()}.json"), **fp}
    emit(args, data, digest.hex())
    return 0


def _load_tree(host: Host, ref: str) -> filetree.Manifest:
    src = Path(ref)
    if not src.exists():
        try:
            bytes.fromhex(ref)
        except ValueError:
            raise StellarError(f"{ref} is neither a manifest file nor a digest") from None
        src = _trees(host) / f"{ref}.json"
    return filetree.load(src, host.hasher)


def _stack(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    merged = filetree.stack(_load_tree(host, ref) for ref in args.layers)
    digest = filetree.save(merged, _trees(host), host.hasher, host.store, held=False)
    emit(args, {"digest": digest.hex(), "entries": len(merged)}, digest.hex())
    return 0


def _restore(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    m = _load_tree(host, args.manifest)
    filetree.restore(m, host.store, args.dir, host.hasher)
    emit(args, {"restored": args.dir, "entries": len(m)},
         f"restored {len(m)} entries to {args.dir}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; each client gets its own virtio-stellar device.

    The device comes from the plugin registry, so the request logic is the very
    one Volt runs in-process. A writable volume takes one client at a time (the
    volume's writer lock); a read-only one any number.
    """
    import logging
    import signal

    from stellarium_core.hookspecs import DeviceContext
    from stellarium_core.virtio.vhost_user import VhostUserServer, release

    host = Host.from_config(args.config)
    params: dict[str, Any] = {"volume": args.name, "readonly": args.readonly}
    context = DeviceContext(host)

    def device() -> Any:
        return host.registry.create("device", "virtio-stellar", params, context=context)

    release(device())               # a missing or locked volume fails here, with exit 1
    logging.basicConfig(level=logging.INFO, format="stellar vol serve: %(message)s")
    server = VhostUserServer(args.vhost_user, device)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    mode = "read-only" if args.readonly else "read-write"
    print(f"serving volume {args.name} ({mode}) as vhost-user-blk on {args.vhost_user}",
          flush=True)
    server.serve_forever()
    return 0
