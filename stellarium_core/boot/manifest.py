"""The BootManifest: everything a microVM boot needs, as one small content-addressed record.

A manifest names the kernel and (optionally) the initrd by their whole-file
digests *and* the NEBULA chunks they are stored as, so a boot reassembles and
verifies them from the store alone, with no registry lookup; the root disk as
the virtio-stellar device parameters say it (``volume=NAME`` or ``image=NAME``);
the command line, memory size and vCPU count a boot uses unless told otherwise;
and the prefetch set: the chunks a first boot read, in the order it read them.

The encoding is canonical JSON (sorted keys, no spaces), so equal manifests
have equal digests. :func:`decode` trusts nothing: every field is checked for
type, range and size, unknown fields are refused, and a size cap keeps a
hostile manifest from costing more than it may.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from stellarium_core.errors import StellarError

FORMAT = "stellar-boot/1"
#: Bounds of a manifest as stored (and so of everything in it).
MAX_BYTES = 4 << 20
MAX_PREFETCH = 32768          # chunk digests (2 GiB of 64 KiB chunks)
MAX_BLOB_CHUNKS = 8192        # chunks of a kernel or an initrd (at least 128 MiB)
MAX_BLOB_BYTES = 1 << 30
MAX_CMDLINE = 2047            # Linux's x86 COMMAND_LINE_SIZE - 1
MAX_MEMORY_MIB = 64 * 1024
MAX_VCPUS = 32
ROOT_KINDS = ("volume", "image")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_ROOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,254}")


class BootManifestError(StellarError):
    """A boot manifest that is malformed, or names what the store does not hold."""


@dataclass(frozen=True)
class Blob:
    """A kernel or initrd: its whole-file digest and size, and the chunks it is stored as."""

    digest: str
    size: int
    chunks: tuple[tuple[bytes, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "size": self.size,
                "chunks": [[d.hex(), n] for d, n in self.chunks]}


@dataclass(frozen=True)
class BootManifest:
    """One recorded boot (see the module docstring)."""

    kernel: Blob
    root_kind: str                 # "volume" | "image"
    root: str
    cmdline: str = ""
    memory_mib: int = 128
    vcpus: int = 1
    initrd: Blob | None = None
    prefetch: tuple[bytes, ...] = ()

    def encode(self) -> bytes:
        """Canonical bytes; ``decode(m.encode())`` checks a manifest built in Python."""
        doc = {"format": FORMAT, "kernel": self.kernel.to_json(),
               "root": {self.root_kind: self.root}, "cmdline": self.cmdline,
               "memory_mib": self.memory_mib, "vcpus": self.vcpus,
               "prefetch": [d.hex() for d in self.prefetch]}
        if self.initrd is not None:
            doc["initrd"] = self.initrd.to_json()
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def device_params(self) -> dict[str, str]:
        """The root disk as virtio-stellar parameters (read-only for an image)."""
        return {self.root_kind: self.root}

    def chunks(self) -> Counter[bytes]:
        """Every chunk the manifest names (kernel, initrd, prefetch set), one per mention."""
        out: Counter[bytes] = Counter(d for d, _ in self.kernel.chunks)
        if self.initrd is not None:
            out.update(d for d, _ in self.initrd.chunks)
        out.update(self.prefetch)
        return out


def _decode_json(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_BYTES:
        raise BootManifestError(f"boot manifest is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BootManifestError(f"boot manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BootManifestError("boot manifest is not a JSON object")
    return doc


def decode(data: bytes) -> BootManifest:
    """A manifest from its stored bytes; BootManifestError says what is wrong."""
    return _check(_decode_json(data))


_REQUIRED = {"format", "kernel", "root", "cmdline", "memory_mib", "vcpus", "prefetch"}
_KNOWN = _REQUIRED | {"initrd"}


def _check(doc: dict[str, Any]) -> BootManifest:
    missing, unknown = _REQUIRED - set(doc), set(doc) - _KNOWN
    if unknown:
        raise BootManifestError(f"boot manifest has unknown fields: {', '.join(sorted(unknown))}")
    if missing:
        raise BootManifestError(f"boot manifest lacks: {', '.join(sorted(missing))}")
    if doc["format"] != FORMAT:
        raise BootManifestError(f"boot manifest format {str(doc['format'])[:40]!r} is not "
                                f"{FORMAT!r}")
    root = doc["root"]
    if not (isinstance(root, dict) and len(root) == 1 and set(root) <= set(ROOT_KINDS)):
        raise BootManifestError('root: expected {"volume": NAME} or {"image": NAME}')
    kind, name = next(iter(root.items()))
    if not isinstance(name, str) or not _ROOT_NAME.fullmatch(name) or ".." in name:
        raise BootManifestError(f"root: bad {kind} name {str(name)[:80]!r}")
    cmdline = doc["cmdline"]
    if not isinstance(cmdline, str) or len(cmdline) > MAX_CMDLINE or not cmdline.isprintable():
        raise BootManifestError(f"cmdline: expected printable text of at most {MAX_CMDLINE} "
                                "characters")
    prefetch = doc["prefetch"]
    if not isinstance(prefetch, list) or len(prefetch) > MAX_PREFETCH:
        raise BootManifestError(f"prefetch: expected a list of at most {MAX_PREFETCH} "
                                "chunk digests")
    return BootManifest(
        kernel=_blob(doc["kernel"], "kernel"),
        initrd=None if doc.get("initrd") is None else _blob(doc["initrd"], "initrd"),
        root_kind=kind, root=name, cmdline=cmdline,
        memory_mib=_int(doc["memory_mib"], "memory_mib", 8, MAX_MEMORY_MIB),
        vcpus=_int(doc["vcpus"], "vcpus", 1, MAX_VCPUS),
        prefetch=tuple(parse_digest(h, f"prefetch[{i}]") for i, h in enumerate(prefetch)))


def _int(v: Any, what: str, low: int, high: int) -> int:
    if type(v) is not int or not low <= v <= high:
        raise BootManifestError(f"{what}: expected an integer {low}..{high}, got {str(v)[:40]}")
    return v


def parse_digest(h: Any, what: str) -> bytes:
    """A chunk digest from its hex text; BootManifestError naming ``what`` otherwise."""
    if not isinstance(h, str) or not _HEX64.fullmatch(h):
        raise BootManifestError(f"{what}: {str(h)[:80]!r} is not a chunk digest "
                                "(64 lowercase hex digits)")
    return bytes.fromhex(h)


def _blob(doc: Any, what: str) -> Blob:
    if not isinstance(doc, dict) or set(doc) != {"digest", "size", "chunks"}:
        raise BootManifestError(f"{what}: expected {{digest, size, chunks}}")
    digest = doc["digest"]
    parse_digest(digest, f"{what}.digest")
    size = _int(doc["size"], f"{what}.size", 1, MAX_BLOB_BYTES)
    chunks = doc["chunks"]
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_BLOB_CHUNKS:
        raise BootManifestError(f"{what}.chunks: expected 1..{MAX_BLOB_CHUNKS} "
                                "[digest, length] pairs")
    out = []
    for i, pair in enumerate(chunks):
        if not isinstance(pair, list) or len(pair) != 2:
            raise BootManifestError(f"{what}.chunks[{i}]: expected [digest, length]")
        out.append((parse_digest(pair[0], f"{what}.chunks[{i}]"),
                    _int(pair[1], f"{what}.chunks[{i}] length", 1, MAX_BLOB_BYTES)))
    if sum(n for _, n in out) != size:
        raise BootManifestError(f"{what}: its chunks add up to {sum(n for _, n in out)} "
                                f"bytes, not its size {size}")
    return Blob(digest, size, tuple(out))
