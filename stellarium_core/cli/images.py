"""``stellar image import|ls|rm|vmdisk``, ``stellar publish`` and ``stellar pull``."""

from __future__ import annotations

import argparse

from stellarium_core.cli.common import JSON, emit, table
from stellarium_core.distribution import (
    FetchPolicy,
    ImageStore,
    Importer,
    Puller,
    parse_url,
    publish,
    shared_chunks,
)
from stellarium_core.distribution.vmdisk import prune_vm_disks, vm_disk
from stellarium_core.errors import UsageError
from stellarium_core.host import Host
from stellarium_core.volumes.imagedisk import ImageDisks

#: Parallel GETs: one keep-alive connection and thread each; more only hurts the origin.
MAX_WORKERS = 64


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="container images (layered file-tree manifests)")
    s = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    imp = s.add_parser("import", parents=[JSON],
                       help="import a directory, rootfs tarball, OCI layout or docker-save tar")
    imp.add_argument("source")
    imp.add_argument("name")
    imp.set_defaults(func=_import)
    ls = s.add_parser("ls", parents=[JSON], help="list images and the chunks they share")
    ls.set_defaults(func=_ls)
    rm = s.add_parser("rm", parents=[JSON], help="remove an image name (and unused layers)")
    rm.add_argument("name")
    rm.set_defaults(func=_rm)
    vm = s.add_parser("vmdisk", parents=[JSON],
                      help="the image's VM form: a read-only EROFS disk over the image's own "
                           "chunks (built once per image content)")
    vm.add_argument("name")
    vm.add_argument("--export", metavar="FILE",
                    help="also write the disk as a sparse raw image (e.g. to loop-mount)")
    vm.add_argument("--hot", action="store_true",
                    help="also read every chunk of the disk through PHOTON, so that VMs "
                         "booting it find them verified and decompressed in the host-wide "
                         "hot tier (a confined VMM uses that tier but never fills it)")
    vm.set_defaults(func=_vmdisk)

    pub = sub.add_parser("publish", parents=[JSON],
                         help="write an image as static CDN files (manifests/, blobs/, tags/)")
    pub.add_argument("image")
    pub.add_argument("directory")
    pub.add_argument("--gzip", action="store_true",
                     help="also write blobs/<hash>.gz where it saves space (nginx gzip_static)")
    pub.set_defaults(func=_publish)

    pull = sub.add_parser("pull", parents=[JSON],
                          help="fetch an image over HTTP(S), only the chunks this store lacks")
    pull.add_argument("url", help="BASE/tags/NAME or BASE/manifests/HASH.json")
    pull.add_argument("name", help="local name to bind when everything is present")
    pull.add_argument("--workers", type=int, default=8,
                      help=f"parallel GETs (default 8, at most {MAX_WORKERS})")
    pull.add_argument("--timeout", type=float, default=30.0,
                      help="seconds one GET may take in all, however the server trickles "
                           "(default 30)")
    pull.add_argument("--attempts", type=int, default=4,
                      help="tries per object, with exponential backoff (default 4)")
    pull.set_defaults(func=_pull)


def _import(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    digest = Importer(ImageStore.for_host(host), host.chunker, host.hasher).import_path(
        args.source, args.name)
    emit(args, {"name": args.name, "digest": digest.hex()}, f"{args.name} {digest.hex()}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    images = ImageStore.for_host(Host.from_config(args.config))
    rows = images.listing()
    totals = shared_chunks(images)

    def human(_: object) -> str:
        body = table([(r["name"], r["digest"][:16], r["layers"], r["entries"], r["bytes"],
                       r["chunks"], r["shared_chunks"]) for r in rows],
                     ("NAME", "DIGEST", "LAYERS", "ENTRIES", "BYTES", "CHUNKS", "SHARED"))
        return (f"{body}\n{totals['image_chunks']} distinct chunks in images, "
                f"{totals['chunks_shared_between_images']} held by more than one image")

    emit(args, {"images": rows, **totals}, human)
    return 0


def _rm(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    images = ImageStore.for_host(host)
    images.remove(args.name)
    pruned = prune_vm_disks(images, ImageDisks.for_host(host))
    emit(args, {"removed": args.name, "vm_disks_removed": len(pruned)},
         f"removed {args.name}" + (f" and {len(pruned)} VM disk(s)" if pruned else ""))
    return 0


def _vmdisk(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    disks = ImageDisks.for_host(host)
    res = vm_disk(ImageStore.for_host(host), disks, args.name)
    if args.export:
        disks.export_raw(res.image, args.export)
    hot = host.photon.prefetch(res.disk.digests()) if args.hot else 0
    data = {"name": args.name, "image": res.image.hex(), "built": res.built,
            "path": str(disks.path(res.image)), "size": res.disk.size,
            "extents": len(res.disk.extents), "chunks": len(res.disk.digests()),
            "manifest_bytes": disks.path(res.image).stat().st_size,
            "image_bytes": res.image_bytes, "added_bytes": res.added_bytes,
            "added_pct": round(100 * res.added_bytes / max(res.image_bytes, 1), 3),
            "exported": args.export, "hot_chunks": hot}
    emit(args, data, f"{args.name}: VM disk {'built' if res.built else 'up to date'}, "
                     f"{res.disk.size} bytes, {data['extents']} extents over "
                     f"{data['chunks']} chunks; adds {res.added_bytes} bytes of metadata "
                     f"({data['added_pct']}% over the image's {res.image_bytes} bytes)")
    return 0


def _publish(args: argparse.Namespace) -> int:
    res = publish(ImageStore.for_host(Host.from_config(args.config)), args.image, args.directory,
                  gzip=args.gzip)
    data = {"digest": res.digest.hex(), "manifest": f"manifests/{res.digest.hex()}.json",
            "tag": res.tag, "blobs_written": res.blobs_written,
            "blobs_skipped": res.blobs_skipped, "bytes_written": res.bytes_written,
            "gzipped": res.gzipped}
    emit(args, data, f"published {args.image}: {res.tag} -> {data['manifest']} "
                     f"({res.blobs_written} blobs written, {res.blobs_skipped} already there)")
    return 0


def _pull(args: argparse.Namespace) -> int:
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be 1..{MAX_WORKERS}, got {args.workers}")
    policy = FetchPolicy(timeout=args.timeout, attempts=args.attempts)  # checks both
    base, tag, digest = parse_url(args.url)
    host = Host.from_config(args.config)
    res = Puller(ImageStore.for_host(host), base, workers=args.workers, policy=policy,
                 router=host.photon).pull(args.name, tag=tag, digest=digest)
    data = {"name": args.name, "digest": res.digest.hex(), "blobs_needed": res.blobs_needed,
            "blobs_fetched": res.blobs_fetched, "blobs_resumed": res.blobs_resumed,
            "blobs_from_tiers": res.blobs_from_tiers, "bytes_fetched": res.bytes_fetched,
            "requests": res.requests}
    emit(args, data, f"pulled {args.name} {res.digest.hex()}: {res.blobs_fetched} of "
                     f"{res.blobs_needed} blobs fetched, {res.bytes_fetched} bytes")
    return 0
