"""The snapshot manifest: one small NEBULA chunk naming everything a paused VM was.

It holds the VM's configuration (device set, memory size, vCPUs), the CPU it was
taken on, guest memory as :class:`~volt.snapshot.pages.Piece` s (the data is in
those chunks, not here), the raw KVM state of every vCPU and of the VM (irqchip,
PIT, kvmclock), every device's saved state, and the TinyVol snapshots of its
volumes. The encoding is canonical JSON, so equal snapshots have equal digests.
:func:`decode` trusts nothing: a snapshot may come from another host or a hostile
hand, so every field is checked for type, size and range here, and the state
blobs again by whoever restores them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from stellarium_core.errors import StellarError
from volt.snapshot.pages import Piece, check

FORMAT = "volt-snapshot/1"
KINDS = ("Full", "Diff")
MAX_BYTES = 64 << 20
MAX_BLOB = 1 << 20          # hex characters of one KVM state blob (XSAVE is 4 KiB and more)
_HEX = re.compile(r"(?:[0-9a-f]{2})*")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class SnapshotError(StellarError):
    """A snapshot that is malformed, incomplete, or does not fit this host."""


@dataclass(frozen=True)
class Manifest:
    """One snapshot (see the module docstring)."""

    kind: str
    config: dict[str, Any]
    cpu: str
    memory_size: int
    pieces: tuple[Piece, ...]
    vm: dict[str, bytes]
    vcpus: tuple[dict[str, bytes], ...]
    devices: dict[str, Any]
    legacy: dict[str, Any]
    volumes: dict[str, str] = field(default_factory=dict)
    parent: bytes | None = None

    def encode(self) -> bytes:
        doc = {"format": FORMAT, "kind": self.kind, "config": self.config, "cpu": self.cpu,
               "memory": {"size": self.memory_size,
                          "pieces": [[p.offset, p.length, p.digest.hex()]
                                     for p in self.pieces]},
               "vm": _hexed(self.vm), "vcpus": [_hexed(v) for v in self.vcpus],
               "devices": self.devices, "legacy": self.legacy, "volumes": self.volumes,
               "parent": self.parent.hex() if self.parent else None}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def chunks(self) -> list[tuple[bytes, int]]:
        """(digest, length) of every memory chunk, one per piece."""
        return [(p.digest, p.length) for p in self.pieces]


def _hexed(blobs: dict[str, bytes]) -> dict[str, str]:
    return {k: v.hex() for k, v in blobs.items()}


_FIELDS = {"format", "kind", "config", "cpu", "memory", "vm", "vcpus", "devices", "legacy",
           "volumes", "parent"}


def decode(data: bytes) -> Manifest:
    """A manifest from its stored bytes; SnapshotError says what is wrong."""
    if len(data) > MAX_BYTES:
        raise SnapshotError(f"snapshot manifest is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"snapshot manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise SnapshotError(f"snapshot manifest: expected the fields {sorted(_FIELDS)}, "
                            f"got {got}")
    if doc["format"] != FORMAT:
        raise SnapshotError(f"snapshot format {str(doc['format'])[:40]!r} is not {FORMAT!r}")
    if doc["kind"] not in KINDS:
        raise SnapshotError(f"snapshot kind must be one of {', '.join(KINDS)}")
    for key in ("config", "devices", "legacy", "volumes"):
        if not isinstance(doc[key], dict):
            raise SnapshotError(f"snapshot manifest: {key} must be an object")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in doc["volumes"].items()):
        raise SnapshotError("snapshot manifest: volumes must map device ids to volume names")
    if not isinstance(doc["cpu"], str) or len(doc["cpu"]) > 200:
        raise SnapshotError("snapshot manifest: cpu must be a short text")
    vcpus = doc["vcpus"]
    if not isinstance(vcpus, list) or not 1 <= len(vcpus) <= 256:
        raise SnapshotError("snapshot manifest: vcpus must list 1..256 vCPU states")
    parent = doc["parent"]
    if parent is not None and not (isinstance(parent, str) and _DIGEST.fullmatch(parent)):
        raise SnapshotError("snapshot manifest: parent must be a manifest digest or null")
    size, pieces = _memory(doc["memory"])
    return Manifest(doc["kind"], doc["config"], doc["cpu"], size, pieces, _blobs(doc["vm"], "vm"),
                    tuple(_blobs(v, f"vcpus[{i}]") for i, v in enumerate(vcpus)),
                    doc["devices"], doc["legacy"], doc["volumes"],
                    bytes.fromhex(parent) if parent else None)


def _memory(doc: Any) -> tuple[int, tuple[Piece, ...]]:
    if not isinstance(doc, dict) or set(doc) != {"size", "pieces"}:
        raise SnapshotError("snapshot manifest: memory must be {size, pieces}")
    size, raw = doc["size"], doc["pieces"]
    if type(size) is not int or size <= 0 or size > 1 << 46:
        raise SnapshotError(f"snapshot memory size {str(size)[:40]} is not a positive byte count")
    if not isinstance(raw, list):
        raise SnapshotError("snapshot memory pieces must be a list")
    pieces = []
    for i, p in enumerate(raw):
        if not (isinstance(p, list) and len(p) == 3 and type(p[0]) is int
                and type(p[1]) is int and isinstance(p[2], str) and _DIGEST.fullmatch(p[2])):
            raise SnapshotError(f"snapshot memory piece {i}: expected [offset, length, digest]")
        pieces.append(Piece(p[0], p[1], bytes.fromhex(p[2])))
    problem = check(pieces, size)
    if problem:
        raise SnapshotError(f"snapshot memory: {problem}")
    return size, tuple(pieces)


def _blobs(doc: Any, what: str) -> dict[str, bytes]:
    if not isinstance(doc, dict):
        raise SnapshotError(f"snapshot manifest: {what} must be an object of hex blobs")
    out = {}
    for k, v in doc.items():
        if not (isinstance(v, str) and len(v) <= MAX_BLOB and _HEX.fullmatch(v)):
            raise SnapshotError(f"snapshot manifest: {what}.{str(k)[:40]} is not a hex blob "
                                f"of at most {MAX_BLOB // 2} bytes")
        out[k] = bytes.fromhex(v)
    return out
