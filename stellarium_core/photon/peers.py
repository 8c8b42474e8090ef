"""Other nodes as a read level of PHOTON: chunks fetched over HTTP by digest.

Every node serves the chunks it holds at ``GET <url>/chunks/<hex>`` (``stellar
node serve``). Which peers to ask for a chunk, and in what order, is placement:
a consistent-hashing ring over every node's name (this one included) gives each
chunk a home, and the ``fanout`` nodes after it; this node asks those peers,
home first. Adding or removing a node moves only the chunks next to it on the
ring, so the other nodes keep asking the same peers for everything else.

The ring is ``uhashring`` (ketama-compatible, maintained): the same points on
every node without coordination, which a hand-rolled ring would have to prove.

Nothing a peer sends is trusted: a body that does not hash to the digest asked
for is counted (``corrupt``), logged, and the next peer is asked.
"""

from __future__ import annotations

import http.client
import logging
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from uhashring import HashRing

from stellarium_core.hookspecs import Hasher, TierUnavailable, TierUsage

log = logging.getLogger("stellarium.photon.peers")
MAX_CHUNK = 16 << 20  # NEBULA's limit: a peer sending more is wrong


class PeerTier:
    """A read-only level: ``get`` asks peers in ring order and returns the first body
    that hashes to the key. The router never places chunks here."""

    name = "peers"
    verified = True  # get() hashes every body itself

    def __init__(self, node: str, peers: Mapping[str, str], hasher: Hasher, *,
                 fanout: int = 2, timeout: float = 5.0) -> None:
        self.node = node or socket.gethostname()
        self.peers = {name: url.rstrip("/") for name, url in peers.items()}
        self.hasher = hasher
        self.fanout = fanout
        self.timeout = timeout
        self.ring = HashRing(nodes=[self.node, *self.peers])
        self.stats: Any = None  # the router lends its counters (see PhotonRouter)

    def order(self, key: bytes) -> list[str]:
        """The peers to ask for ``key``: its home on the ring first, ``fanout`` in all."""
        names = [n["nodename"] for n in self.ring.range(key.hex(), unique=True)
                 if n["nodename"] != self.node]
        return names[: self.fanout]

    def _count(self, field: str) -> None:
        if self.stats is not None:
            self.stats.add(self.name, field)

    def _fetch(self, name: str, key: bytes) -> bytes | None:
        """One peer's body for ``key`` (None: it has none); OSError when unreachable."""
        url = urlsplit(self.peers[name])
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else \
            http.client.HTTPConnection
        conn = conn_cls(url.netloc, timeout=self.timeout)
        try:
            conn.request("GET", f"{url.path.rstrip('/')}/chunks/{key.hex()}")
            resp = conn.getresponse()
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status} {resp.reason}")
            body = resp.read(MAX_CHUNK + 1)
            if len(body) > MAX_CHUNK:
                raise OSError(f"a body of more than {MAX_CHUNK} bytes")
            return body
        except (http.client.HTTPException, ValueError) as exc:
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()

    def get(self, key: bytes) -> bytes | None:
        """The chunk from the first peer (in ring order) whose bytes hash to ``key``."""
        unreachable = []
        for name in self.order(key):
            try:
                body = self._fetch(name, key)
            except OSError as exc:
                unreachable.append(f"peer {name} ({self.peers[name]}): {exc}")
                continue
            if body is None:
                continue
            if self.hasher.digest(body) != key:
                self._count("corrupt")
                log.warning("peer %s (%s) sent %d bytes for chunk %s that do not hash to it; "
                            "skipped", name, self.peers[name], len(body), key.hex())
                continue
            return body
        if unreachable:
            raise TierUnavailable("; ".join(unreachable))
        return None

    def put(self, key: bytes, data: bytes | memoryview) -> None:
        raise TierUnavailable("peers are read from, never written to")

    def contains(self, key: bytes) -> bool:
        return False  # never a durable copy for this node's eviction decisions

    def delete(self, key: bytes) -> None:
        """Nothing of ours is there."""

    def keys(self) -> Iterator[bytes]:
        return iter(())

    def usage(self) -> TierUsage:
        return TierUsage(len(self.peers), 0, None)

    def close(self) -> None:
        """Connections are per request; nothing to release."""
