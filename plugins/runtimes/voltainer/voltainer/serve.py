"""``python -m voltainer.serve [--config CFG] DIGEST MOUNTPOINT``: the FUSE server process.

It runs apart from the runner so the runner can supervise it; it dies with the
runner (PR_SET_PDEATHSIG), and ``voltainer gc`` clears the mount it leaves.
"""

from __future__ import annotations

import argparse
import sys

from stellarium_core.distribution import ImageStore
from stellarium_core.errors import StellarError
from stellarium_core.host import Host
from voltainer.fusefs import serve, tree_from_manifest


def main(argv: list[str] | None = None) -> int:
    """Serve the image until unmounted or killed; 1 with one line if it cannot start."""
    p = argparse.ArgumentParser(prog="voltainer-serve")
    p.add_argument("--config")
    p.add_argument("digest", type=bytes.fromhex, help="image manifest digest (hex)")
    p.add_argument("mountpoint")
    args = p.parse_args(argv)
    try:
        host = Host.from_config(args.config)
        images = ImageStore.for_host(host)
        tree = tree_from_manifest(images.flatten(args.digest))
        serve(tree, host.photon.view, host.hasher, args.mountpoint)
        host.photon.stats.save()  # the runner waits for this before it signals
    except StellarError as exc:
        print(f"voltainer-serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
