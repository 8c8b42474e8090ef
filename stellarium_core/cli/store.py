"""``stellar ingest|cat|stats|gc|fsck``: the chunk store from the command line."""

from __future__ import annotations

import argparse
import sys

from stellarium_core.cli.common import JSON, emit, table
from stellarium_core.distribution import ImageStore
from stellarium_core.distribution.vmdisk import prune_vm_disks, sharing
from stellarium_core.errors import UsageError
from stellarium_core.host import Host
from stellarium_core.volumes.imagedisk import ImageDisks
from stellarium_core.volumes.volume import VolumeStore


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", parents=[JSON],
                       help="store a file or directory tree; print its manifest hash")
    p.add_argument("path", help="file or directory to ingest (recursively)")
    p.set_defaults(func=_ingest)
    p = sub.add_parser("cat", help="write a chunk's bytes to stdout")
    p.add_argument("hash", help="chunk digest, 64 hex digits")
    p.set_defaults(func=_cat)
    p = sub.add_parser("stats", parents=[JSON],
                       help="logical/unique bytes, dedup, compression, VM/image sharing")
    p.set_defaults(func=_stats)
    p = sub.add_parser("gc", parents=[JSON],
                       help="drop VM disks of removed images, reclaim unreferenced chunks "
                            "and what dead operations left, compact packs")
    p.set_defaults(func=_gc)
    p = sub.add_parser("fsck", parents=[JSON],
                       help="re-hash every chunk; check index, packs, manifests and counts")
    p.add_argument("--repair", action="store_true",
                   help="re-index chunks found in packs, recount every reference from the "
                        "manifests, set unreadable manifests aside (needs the store to itself)")
    p.set_defaults(func=_fsck)


def _digest(text: str) -> bytes:
    try:
        d = bytes.fromhex(text)
    except ValueError:
        d = b""
    if len(d) != 32:
        raise UsageError(f"{text!r} is not a chunk hash (64 hex digits)")
    return d


def _ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stellarium_core.nebula.ingest import ingest

    host = Host.from_config(args.config)
    store, chunker = host.store, host.chunker
    # A progress bar only for people: not when stderr is a pipe or a file.
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="ingest",
              disable=not sys.stderr.isatty(), leave=False) as bar:
        res = ingest(store, args.path, chunker, progress=bar)
    emit(args, {"manifest": res.manifest.hex(), "files": res.files, "bytes": res.bytes,
                "chunks": res.chunks}, res.manifest.hex())
    return 0


def _cat(args: argparse.Namespace) -> int:
    digest = _digest(args.hash)
    data = Host.from_config(args.config).photon.view(digest)
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


def _catalogs(host: Host) -> tuple[ImageStore, VolumeStore, ImageDisks]:
    return (ImageStore.for_host(host),
            VolumeStore.for_host(host),
            ImageDisks.for_host(host))


def _stats(args: argparse.Namespace) -> int:
    host = Host.from_config(args.config)
    st = host.store.stats()
    share = sharing(*_catalogs(host))

    def human(_: object) -> str:
        return (table(sorted(st.items()), ("stat", "value")) + "\n\n"
                + table(sorted(share.items()), ("sharing: VM volumes / images", "value")))

    emit(args, {**st, "sharing": share}, human)
    return 0


def _gc(args: argparse.Namespace) -> int:
    from stellarium_core import upkeep

    host = Host.from_config(args.config)
    images, _, disks = _catalogs(host)
    pruned = prune_vm_disks(images, disks)  # disks of removed images hold chunks too
    out = {**upkeep.gc(host), "vm_disks_removed": len(pruned)}
    emit(args, out, lambda d: table(sorted(d.items()), ("gc", "count")))
    return 0


def _fsck(args: argparse.Namespace) -> int:
    from stellarium_core import upkeep

    rep = upkeep.fsck(Host.from_config(args.config), repair=args.repair)

    def human(_: object) -> str:
        lines = [str(p) for p in rep.problems]
        lines.append(f"{rep.chunks} chunks, {rep.bytes} bytes checked: "
                     f"{len(rep.errors)} errors"
                     + (f", {rep.repaired} repaired" if rep.repaired else ""))
        if rep.remaining is not None:
            lines += [f"after repair: {p}" for p in rep.remaining]
            lines.append(f"after repair: {len(rep.remaining)} errors")
        return "\n".join(lines)

    emit(args, rep.to_dict(), human)
    return 0 if rep.ok else 1
