"""Live migration between two Volt processes that sends only the chunks the target lacks.

The source (:class:`Source`, the running VM's process):

1. live: hashes the guest's RAM pieces (as a snapshot cuts them) while the guest
   runs and OFFERs their digests; the target answers WANT with the ones its store
   lacks; each is read again and sent as a CHUNK if it still has that digest (a
   piece the guest changed meanwhile is left to step 2);
2. paused, devices quiesced: takes the VM's state (:func:`describe`), reading again
   only the cells written since step 1, OFFERs the pieces, sends what is wanted,
   then the MANIFEST;
3. the target restores the VM (paused) and says READY; the source says GO, the
   target resumes it and says RUNNING, and the source's VM ends.

A failure before GO (the link cut, the target refusing) resumes the VM on the
source. After GO, only the target knows whether it runs the VM, so a source that
hears nothing more leaves its VM paused and says so.

The target (:func:`receive`, before its VM exists) checks every chunk against its
digest and stores it mappable; once the manifest came and names nothing missing, it
records the snapshot ``name`` and restores from it. If the transfer fails, every
reference it took is given back and no record remains.
"""

from __future__ import annotations

import socket
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from volt.snapshot import catalog, pages, wire
from volt.snapshot.machine import QUIESCE_S, describe, track_writes
from volt.snapshot.manifest import decode
from volt.snapshot.wire import MigrationError, Wire

if TYPE_CHECKING:
    from stellarium_core.host import Host
    from volt.snapshot.catalog import Snapshot
    from volt.vmm.config import VmConfig
    from volt.vmm.vm import Machine


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets); MigrationError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MigrationError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class Outcome:
    """What the source sent, against a full copy of the VM's memory."""

    sent_bytes: int = 0
    memory_bytes: int = 0
    offered: int = 0
    sent_chunks: int = 0

    def summary(self) -> dict[str, Any]:
        return {"sent_bytes": self.sent_bytes, "memory_bytes": self.memory_bytes,
                "chunks_offered": self.offered, "chunks_sent": self.sent_chunks}


class Source:
    """The sending side, driven by the VM's instance (see :meth:`run`)."""

    def __init__(self, machine: Machine, cfg: VmConfig, host: Host, sock: socket.socket) -> None:
        if any("volume" in d.params for d in cfg.devices):
            raise MigrationError("live migration of a VM with a writable volume is not "
                                 "built yet (its disk would have to move too)")
        self.machine, self.cfg, self.hasher = machine, cfg, host.hasher
        self.wire = Wire(sock)
        self.outcome = Outcome(memory_bytes=machine.mem.size)
        self.live: list[pages.Piece] = []

    def precopy(self) -> None:
        """Step 1, with the guest running."""
        track_writes(self.machine)
        self.live = pages.save(self.machine.mem, self.hasher.digest)
        self._transfer(self.live)

    def finish(self) -> None:
        """Step 2 and the handover up to READY, paused, in the I/O thread."""
        m = self.machine
        m.devices.quiesce(QUIESCE_S)
        try:
            manifest = describe(m, self.cfg, self.hasher.digest, parent=(self.live, b""))
            self._transfer(manifest.pieces)
            self.wire.send(wire.MANIFEST, manifest.encode())
            self.wire.recv(wire.READY)
        finally:
            m.devices.resume()

    def hand_over(self) -> None:
        """GO, then RUNNING from the target."""
        self.wire.send(wire.GO)
        self.wire.recv(wire.RUNNING)
        self.outcome.sent_bytes = self.wire.sent

    def _transfer(self, offer: list[pages.Piece]) -> None:
        self.wire.send(wire.OFFER, b"".join(p.digest for p in offer))
        self.outcome.offered += len(offer)
        _, payload = self.wire.recv(wire.WANT)
        for i in wire.indices(payload, len(offer)):
            p = offer[i]
            data = bytes(self.machine.mem.view(p.offset + _gap(self.machine, p.offset),
                                               p.length))
            if self.hasher.digest(data) == p.digest:
                self.wire.send(wire.CHUNK, p.digest + data)
                self.outcome.sent_chunks += 1
        self.wire.send(wire.DONE)


def _gap(machine: Machine, flat: int) -> int:
    """What to add to a flat RAM offset to get its guest address (the MMIO gap)."""
    for start, r in pages.flat_regions(machine.mem):
        if start <= flat < start + r.size:
            return r.guest_addr - start
    raise MigrationError(f"flat offset {flat} is outside guest RAM")


def receive(host: Host, sock: socket.socket, name: str) -> tuple[Snapshot, Wire]:
    """Receive a VM's chunks and manifest into ``host``'s store as snapshot ``name``."""
    store = host.store
    w = Wire(sock)
    got: Counter[bytes] = Counter()
    try:
        with store.pending() as journal, store.batch(journal=journal) as batch:
            while True:
                kind, payload = w.recv(wire.OFFER, wire.MANIFEST)
                if kind == wire.MANIFEST:
                    break
                _chunks(w, wire.digests(payload), batch, store, got)
        m = decode(payload)
        missing = [p for p in m.pieces if not store.indexed(p.digest, mappable=True)]
        if missing:
            raise MigrationError(f"the manifest names {len(missing)} chunk(s) that were "
                                 f"not sent (first: {missing[0].digest.hex()})")
        snap = catalog.save(host, name, lambda _batch: (m, list(m.pieces)))
    except BaseException as exc:
        w.fail(str(exc))
        raise
    finally:
        store.release_many(got)     # the record holds what it needs from here
    return snap, w


def _chunks(w: Wire, offer: list[bytes], batch: Any, store: Any, got: Counter[bytes]) -> None:
    """Answer an OFFER and store the CHUNKs that follow, each checked, until DONE."""
    want = [i for i, d in enumerate(offer)
            if d not in got and not store.indexed(d, mappable=True)]
    w.send(wire.WANT, wire.pack_indices(want))
    wanted = {offer[i] for i in want}
    while True:
        kind, payload = w.recv(wire.CHUNK, wire.DONE)
        if kind == wire.DONE:
            return
        digest, data = payload[:wire.DIGEST], payload[wire.DIGEST:]
        if digest not in wanted or not data or len(data) % pages.PAGE:
            raise MigrationError(f"the source sent chunk {digest.hex()[:16]}, which was not "
                                 "asked for or is not whole pages")
        if batch.put(data, mappable=True) != digest:
            raise MigrationError(f"chunk {digest.hex()[:16]} does not match its digest")
        got[digest] += 1
        wanted.discard(digest)


def connect(address: str, timeout: float) -> socket.socket:
    host, port = parse_address(address)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise MigrationError(f"cannot reach {address}: {exc.strerror or exc}") from None


def listen(address: str, timeout: float) -> socket.socket:
    """The one connection a target takes at ``address`` (it waits for it as long as it
    takes; then every step may take ``timeout`` seconds)."""
    host, port = parse_address(address)
    try:
        with socket.create_server((host, port)) as srv:
            conn, _ = srv.accept()
    except OSError as exc:
        raise MigrationError(f"waiting for a migration at {address}: "
                             f"{exc.strerror or exc}") from None
    conn.settimeout(timeout)
    return conn
