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

Disks (volumes) move the same way: their chunks are offered in step 1 as last
flushed and in step 2 as flushed by the pause, then each volume's TinyVol manifest
(and its ShareVol base's) as a VOLUME. A target that holds the base is sent only the
chunks the VM wrote.

The target (:func:`receive`, before its VM exists) checks every chunk against its
digest and stores it (RAM mappable); once the manifest came and names nothing
missing, it imports the disks as read-only volumes, records the snapshot ``name``
and restores from it (each disk a writable clone, as any restore). If the transfer
fails, every reference it took is given back and no record or volume remains.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
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
    """What the source sent, against a full copy of the VM's memory and disks."""

    sent_bytes: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    offered: int = 0
    sent_chunks: int = 0

    def summary(self) -> dict[str, Any]:
        return {"sent_bytes": self.sent_bytes, "memory_bytes": self.memory_bytes,
                "disk_bytes": self.disk_bytes, "chunks_offered": self.offered,
                "chunks_sent": self.sent_chunks}


class Source:
    """The sending side, driven by the VM's instance (:meth:`precopy`, then
    :meth:`finish` paused in the I/O thread, then :meth:`hand_over`)."""

    def __init__(self, machine: Machine, cfg: VmConfig, host: Host, sock: socket.socket) -> None:
        from stellarium_core.volumes.volume import VolumeStore

        self.machine, self.cfg, self.host = machine, cfg, host
        self.volumes = VolumeStore.for_host(host)
        #: device id -> its volume's name here
        self.disks = {d.id: str(d.params["volume"]) for d in cfg.devices
                      if "volume" in d.params}
        self.wire = Wire(sock)
        self.outcome = Outcome(memory_bytes=machine.mem.size)
        self.live: list[pages.Piece] = []

    def precopy(self) -> None:
        """Step 1, with the guest running: RAM as it is now, the disks as last flushed."""
        track_writes(self.machine)
        self.live = pages.save(self.machine.mem, self.host.hasher.digest)
        self._ram(self.live)
        self._disks()

    def finish(self) -> None:
        """Step 2 and the handover up to READY, paused, in the I/O thread."""
        m = self.machine
        m.devices.quiesce(QUIESCE_S)
        try:
            manifest = describe(m, self.cfg, self.host.hasher.digest, parent=(self.live, b""))
            self._ram(list(manifest.pieces))
            for dev, (data, base) in self._disks().items():
                self.wire.send(wire.VOLUME, json.dumps(
                    {"device": dev, "volume": data.hex(), "base": base.hex()}).encode())
            self.wire.send(wire.MANIFEST, manifest.encode())
            self.wire.recv(wire.READY)
        finally:
            m.devices.resume()

    def hand_over(self) -> None:
        """GO, then RUNNING from the target."""
        self.wire.send(wire.GO)
        self.wire.recv(wire.RUNNING)
        self.outcome.sent_bytes = self.wire.sent

    def _ram(self, offer: list[pages.Piece]) -> None:
        mem, digest = self.machine.mem, self.host.hasher.digest

        def read(i: int) -> bytes | None:   # None: the guest changed it since (step 2 sends it)
            p = offer[i]
            data = bytes(mem.view(p.offset + _gap(self.machine, p.offset), p.length))
            return data if digest(data) == p.digest else None

        self._transfer(wire.RAM, [p.digest for p in offer], read)

    def _disks(self) -> dict[str, tuple[bytes, bytes]]:
        """Offer every disk's chunks (base and delta); each disk's manifests."""
        from stellarium_core.volumes import tinyvol

        out, chunks = {}, []
        for dev, name in self.disks.items():
            data, base = self.volumes.manifest_bytes(name)
            out[dev] = (data, base)
            for blob in (base, data) if base else (data,):
                m = tinyvol.decode(blob)
                chunks += [r.digest for r in m.refs.values() if not r.zero]
        self.outcome.disk_bytes = sum(tinyvol.decode(d).size for d, _ in out.values())
        unique = list(dict.fromkeys(chunks))
        self._transfer(wire.DISK, unique, lambda i: self.host.store.get(unique[i]))
        return out

    def _transfer(self, kind: int, digests: list[bytes],
                  read: Callable[[int], bytes | None]) -> None:
        """OFFER ``digests``, then send each one the target WANTs (``read(i)``)."""
        self.wire.send(wire.OFFER, wire.offer(kind, digests))
        self.outcome.offered += len(digests)
        _, payload = self.wire.recv(wire.WANT)
        for i in wire.indices(payload, len(digests)):
            data = read(i)
            if data is not None:
                self.wire.send(wire.CHUNK, digests[i] + data)
                self.outcome.sent_chunks += 1
        self.wire.send(wire.DONE)


def _gap(machine: Machine, flat: int) -> int:
    """What to add to a flat RAM offset to get its guest address (the MMIO gap)."""
    for start, r in pages.flat_regions(machine.mem):
        if start <= flat < start + r.size:
            return r.guest_addr - start
    raise MigrationError(f"flat offset {flat} is outside guest RAM")


def receive(host: Host, sock: socket.socket, name: str) -> tuple[Snapshot, Wire]:
    """Receive a VM's chunks, disks and manifest into ``host``'s store as snapshot
    ``name`` (its disks as read-only volumes ``name.DEVICE``, which it holds)."""
    from stellarium_core.volumes.volume import VolumeStore

    store, vols = host.store, VolumeStore.for_host(host)
    w = Wire(sock)
    got: Counter[bytes] = Counter()
    disks: dict[str, tuple[bytes, bytes]] = {}
    made: list[str] = []
    try:
        with store.pending() as journal, store.batch(journal=journal) as batch:
            while True:
                kind, payload = w.recv(wire.OFFER, wire.VOLUME, wire.MANIFEST)
                if kind == wire.MANIFEST:
                    break
                if kind == wire.VOLUME:
                    dev, data, base = _volume(payload)
                    disks[dev] = (data, base)
                else:
                    _chunks(w, *wire.offered(payload), batch, store, got)
        m = decode(payload)
        missing = [p for p in m.pieces if not store.indexed(p.digest, mappable=True)]
        if missing:
            raise MigrationError(f"the manifest names {len(missing)} chunk(s) that were "
                                 f"not sent (first: {missing[0].digest.hex()})")
        if set(disks) != {d["id"] for d in m.config.get("devices", ())
                          if "volume" in d.get("params", {})}:
            raise MigrationError("the disks sent are not the VM's volumes")
        for dev, (data, base) in disks.items():
            vols.import_volume(f"{name}.{dev}", data, base)
            made.append(f"{name}.{dev}")
        m = replace(m, volumes={dev: f"{name}.{dev}" for dev in disks})
        snap = catalog.save(host, name, lambda _batch: (m, list(m.pieces)))
    except BaseException as exc:
        w.fail(str(exc))
        for v in made:
            vols.delete(v)
        raise
    finally:
        store.release_many(got)     # the record and the volumes hold what they need
    return snap, w


def _volume(payload: bytes) -> tuple[str, bytes, bytes]:
    try:
        doc = json.loads(payload)
        dev, data, base = doc["device"], bytes.fromhex(doc["volume"]), bytes.fromhex(doc["base"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MigrationError("a VOLUME must be {device, volume, base}, manifests in hex") \
            from None
    if not isinstance(dev, str) or not dev:
        raise MigrationError("a VOLUME must name its device")
    return dev, data, base


def _chunks(w: Wire, kind: int, offer: list[bytes], batch: Any, store: Any,
            got: Counter[bytes]) -> None:
    """Answer an OFFER and store the CHUNKs that follow, each checked, until DONE (RAM
    mappable, so a restore maps it)."""
    ram = kind == wire.RAM
    want = [i for i, d in enumerate(offer) if d not in got
            and not (store.indexed(d, mappable=True) if ram else store.contains(d))]
    w.send(wire.WANT, wire.pack_indices(want))
    wanted = {offer[i] for i in want}
    while True:
        kind, payload = w.recv(wire.CHUNK, wire.DONE)
        if kind == wire.DONE:
            return
        digest, data = payload[:wire.DIGEST], payload[wire.DIGEST:]
        if digest not in wanted or not data or (ram and len(data) % pages.PAGE):
            raise MigrationError(f"the source sent chunk {digest.hex()[:16]}, which was not "
                                 "asked for or is not whole pages")
        if batch.put(data, mappable=ram) != digest:
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
