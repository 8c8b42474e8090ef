"""Pull an image over HTTP(S): GET the manifests, GET only the missing blobs, bind.

Order of events, and why:

1. GET the image manifest and each layer manifest this store lacks; each must
   hash to the digest it was asked by, else nothing is kept.
2. Work out which chunks and packs of the new layers the store does not hold and
   fetch only those, from a bounded thread pool: through this host's PHOTON
   router first (peer nodes, then the cold tier, when configured), else with a
   GET from the pull URL. A blob is put into NEBULA only after it hashed to its
   name, so the store never holds unverified bytes.
3. Each committed batch of fetched blobs is listed in ``images/pulls/<hex>.json``.
   Those blobs carry one reference each, so ``gc`` keeps them while the pull is
   unfinished; a pull that is interrupted and run again finds them stored and
   does not fetch them again.
4. Only when every blob is present: take the layers' references (the journal's
   count towards them), write the manifests and bind the name, all under the
   image lock, then drop the journal. A failure before this leaves no name and
   no manifest; a crash after the manifests are written is settled by the next
   attempt, which finds the layers kept and releases the journal's references.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from stellarium_core.distribution.fetch import Fetcher, FetchError, FetchPolicy, split_url
from stellarium_core.distribution.images import (
    ImageError,
    ImageManifest,
    ImageStore,
    check_name,
)
from stellarium_core.errors import UsageError
from stellarium_core.fsutil import write_atomic
from stellarium_core.volumes import filetree
from stellarium_core.volumes.tinyvol import ManifestError

if TYPE_CHECKING:
    from stellarium_core.photon import PhotonRouter

_MANIFEST_URL = re.compile(r"^(?P<base>.*/)manifests/(?P<hex>[0-9a-f]{64})\.json$")
_TAG_URL = re.compile(r"^(?P<base>.*/)tags/(?P<tag>[^/]+)$")
MAX_MANIFEST = 512 << 20  # a tree manifest of ~2M entries
MAX_BLOB = 16 << 20  # NEBULA's chunk size limit
COMMIT_EVERY = 256


@dataclass(frozen=True)
class PullResult:
    """What a pull did: the image digest, blobs needed/fetched, bytes over the wire."""

    digest: bytes
    blobs_needed: int
    blobs_fetched: int
    blobs_resumed: int
    bytes_fetched: int
    requests: int
    blobs_from_tiers: int = 0  # of blobs_fetched: from peers or the cold tier, not the URL


def parse_url(url: str) -> tuple[str, str | None, bytes | None]:
    """``BASE/manifests/<hex>.json`` (pinned) or ``BASE/tags/<name>`` -> (base, tag, digest)."""
    split_url(url)
    m = _MANIFEST_URL.match(url)
    if m:
        return m["base"], None, bytes.fromhex(m["hex"])
    m = _TAG_URL.match(url)
    if m:
        return m["base"], m["tag"], None
    raise UsageError(f"{url}: expected BASE/manifests/<hex>.json or BASE/tags/<name> "
                     "(as printed by `stellar publish`)")


class Puller:
    """Pulls images from one CDN base URL into an :class:`ImageStore`."""

    def __init__(self, images: ImageStore, base_url: str, *, workers: int = 8,
                 policy: FetchPolicy | None = None, progress: bool | None = None,
                 sleep: Callable[[float], None] | None = None,
                 router: PhotonRouter | None = None) -> None:
        self.images = images
        self.router = router
        self.from_tiers = 0
        self.hasher = images.hasher
        kw = {"sleep": sleep} if sleep else {}
        self.fetcher = Fetcher(base_url, policy, **kw)
        self.workers = max(1, workers)
        self.progress = sys.stderr.isatty() if progress is None else progress

    def _verified(self, digest: bytes) -> Callable[[bytes], str | None]:
        def check(body: bytes) -> str | None:
            got = self.hasher.digest(body)
            if got != digest:
                return (f"content does not match its hash (got {got.hex()[:16]}..., "
                        f"{len(body)} bytes)")
            return None
        return check

    def _manifest(self, digest: bytes) -> bytes:
        kept = self.images.intact(digest)
        if kept is not None:
            return kept
        return self.fetcher.get(f"manifests/{digest.hex()}.json", self._verified(digest),
                                limit=MAX_MANIFEST)

    def resolve_tag(self, tag: str) -> bytes:
        body = self.fetcher.get(f"tags/{tag}", limit=4096)
        text = body.decode("ascii", "replace").strip()
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise FetchError(f"GET {self.fetcher.url('tags/' + tag)}: not a manifest digest")
        return bytes.fromhex(text)

    # -- the journal of fetched blobs ---------------------------------------------------

    def _journal_path(self, digest: bytes) -> Path:
        return self.images.pulls / f"{digest.hex()}.json"

    def _journal(self, digest: bytes) -> set[bytes]:
        try:
            with open(self._journal_path(digest)) as fh:
                return {bytes.fromhex(h) for h in json.load(fh)}
        except FileNotFoundError:
            return set()
        except (ValueError, TypeError):
            raise ImageError(
                f"{self._journal_path(digest)} is corrupt; remove it to pull afresh "
                "(the chunks it listed keep one leaked reference each)") from None

    def _save_journal(self, digest: bytes, held: set[bytes]) -> None:
        write_atomic(self._journal_path(digest),
                     json.dumps(sorted(h.hex() for h in held)).encode())

    # -- the pull ---------------------------------------------------------------------

    def pull(self, name: str, *, tag: str | None = None, digest: bytes | None = None) -> PullResult:
        check_name(name)
        if digest is None:
            if tag is None:
                raise UsageError("pull needs a tag or a manifest digest")
            digest = self.resolve_tag(tag)
        # Two pulls of one image share its journal: the second waits for the first.
        with open(self.images.pulls / f"{digest.hex()}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._pull_locked(name, digest)

    def _pull_locked(self, name: str, digest: bytes) -> PullResult:
        try:
            image = ImageManifest.decode(self._manifest(digest))
            if image.hasher != self.hasher.name:
                raise ImageError(f"image {digest.hex()} is hashed with {image.hasher!r}; "
                                 f"this store uses {self.hasher.name!r}")
            new_layers: dict[bytes, filetree.Manifest] = {}
            for ld in image.layers:  # missing, or kept but damaged since (rewritten)
                if self.images.intact(ld) is None and ld not in new_layers:
                    new_layers[ld] = filetree.Manifest.decode(self._manifest(ld))
        except ManifestError as exc:
            raise ImageError(f"{self.fetcher.base_url}: {exc}") from None

        refs: Counter[bytes] = Counter()
        sizes: dict[bytes, int] = {}
        for layer in new_layers.values():
            refs.update(filetree.references(layer))
            for e in layer:
                sizes.update(e.chunks)
        store = self.images.store
        held = self._journal(digest)
        missing = store.missing(d for d in refs if d not in held)
        resumed = sum(1 for d in refs if d in held)
        fetched = self._fetch_all(digest, missing, sizes, held)

        with self.images.locked():
            self.images.keep_pulled(list(new_layers.values()), held)
            self.images.bind(name, image)
        if held:
            os.unlink(self._journal_path(digest))
        return PullResult(digest, len(refs), fetched, resumed,
                          self.fetcher.bytes_received, self.fetcher.requests, self.from_tiers)

    def _fetch_all(self, digest: bytes, missing: list[bytes], sizes: dict[bytes, int],
                   held: set[bytes]) -> int:
        """GET ``missing`` with at most ``workers`` in flight; put each verified blob."""
        if not missing:
            return 0
        store = self.images.store
        total = sum(sizes.get(d, 64 << 10) for d in missing)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="pull",
                   disable=not self.progress, file=sys.stderr)
        done = 0
        pending: set[bytes] = set()
        todo = iter(missing)

        def get(d: bytes) -> tuple[bytes, bytes, bool]:
            body = self.router.fetch(d) if self.router is not None else None
            if body is not None:
                return d, body, True
            body = self.fetcher.get(f"blobs/{d.hex()}", self._verified(d), limit=MAX_BLOB)
            if d in sizes and len(body) != sizes[d]:
                raise FetchError(f"GET {self.fetcher.url('blobs/' + d.hex())}: "
                                 f"{len(body)} bytes, the manifest says {sizes[d]}")
            return d, body, False

        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pull")
        inflight: set[Future[tuple[bytes, bytes, bool]]] = set()
        batch = store.batch()

        def commit() -> None:
            batch.commit()
            held.update(pending)
            pending.clear()
            self._save_journal(digest, held)

        try:
            while True:
                while len(inflight) < self.workers * 4:
                    d = next(todo, None)
                    if d is None:
                        break
                    inflight.add(pool.submit(get, d))
                if not inflight:
                    break
                finished, inflight = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    d, body, from_tiers = fut.result()
                    self.from_tiers += from_tiers
                    batch.put(body)
                    pending.add(d)
                    done += 1
                    bar.update(len(body))
                    if len(pending) >= COMMIT_EVERY:
                        commit()
        finally:
            # Verified blobs are kept (and journaled) even when the pull fails, so
            # the next attempt does not fetch them again.
            if pending:
                commit()
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()
        return done
