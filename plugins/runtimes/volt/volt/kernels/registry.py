"""The kernel registry: kernel images stored in NEBULA, described by small JSON records.

A record ``<store>/records/kernels/<name>.json`` names one kernel and holds, per
image it has (``vmlinux``, ``bzImage``, and optionally the ``initrd`` that goes with
it), the image's whole-file digest, and under ``"chunks"`` the FastCDC chunk list it
was stored as. That is the core's contract for plugin records that hold references
(:mod:`stellarium_core.holders`), so ``stellar fsck`` counts them. Chunks are
reference counted, so two kernels that share most bytes share most chunks, and
replacing or removing a record releases exactly the references it held.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stellarium_core.errors import StellarError, UsageError
from stellarium_core.fsutil import fsync_dir, write_atomic
from stellarium_core.holders import record_dir, records_locked
from stellarium_core.host import Host
from stellarium_core.nebula import Batch
from volt.kernels.build import KernelBuild
from volt.kernels.formats import inspect

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
#: Image slot names by format.
SLOTS = {"elf": "vmlinux", "bzimage": "bzImage"}
INITRD = "initrd"


@dataclass(frozen=True)
class KernelRecord:
    """A registered kernel as stored in its JSON record."""

    name: str
    data: dict[str, Any]

    @property
    def images(self) -> dict[str, dict[str, Any]]:
        return self.data["images"]

    def chunks(self, slot: str) -> list[list[Any]]:
        """[[digest hex, length], ...] of one image."""
        return self.data["chunks"][slot]

    def references(self) -> Counter[bytes]:
        return Counter(bytes.fromhex(d) for slot in self.images for d, _n in self.chunks(slot))

    def digests(self) -> list[str]:
        return [img["digest"] for img in self.images.values()]


def _dir(host: Host) -> Path:
    return record_dir(host.store_path, "kernels")


def _locked(host: Host) -> AbstractContextManager[Path]:
    return records_locked(host.store_path, "kernels")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise UsageError(f"bad kernel name {name!r}: use letters, digits and . _ + - "
                         "(at most 128, starting with a letter or digit)")
    return name


def _store_image(host: Host, batch: Batch, path: Path,
                 info: dict[str, Any]) -> tuple[dict[str, Any], list[list[Any]]]:
    chunks = batch.put_stream(path, host.chunker)
    h = host.hasher.new()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return ({"digest": h.digest().hex(), "size": sum(n for _, n in chunks), **info},
            [[d.hex(), n] for d, n in chunks])


def register(host: Host, name: str, images: dict[str, Path], meta: dict[str, Any]) -> KernelRecord:
    """Store ``images`` (slot -> file) in NEBULA and write the record ``name``.

    Re-registering a name replaces it; the old record's chunk references are
    released. Until the record holds them, the references are journaled, so a
    killed import leaks nothing ``stellar gc`` cannot release.
    """
    check_name(name)
    stored, chunks = {}, {}
    with host.store.pending() as journal:
        with host.store.batch(journal=journal) as batch:
            for slot, path in images.items():
                info = {"format": INITRD} if slot == INITRD else inspect(path).to_dict()
                stored[slot], chunks[slot] = _store_image(host, batch, path, info)
        journal.settle()
    record = {"name": name, "registered": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "hasher": host.hasher.name, **meta, "images": stored, "chunks": chunks}
    rec = KernelRecord(name, record)
    try:
        with _locked(host) as d:
            old = _read(d / f"{name}.json")
            write_atomic(d / f"{name}.json",
                         (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    except BaseException:
        host.store.release_many(rec.references())
        raise
    if old is not None:
        host.store.release_many(old.references())
    return rec


def _read(path: Path) -> KernelRecord | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise StellarError(f"{path}: damaged kernel record: {exc}") from None
    if (not isinstance(data, dict) or not isinstance(data.get("name"), str)
            or not isinstance(data.get("images"), dict)
            or not isinstance(data.get("chunks"), dict)
            or set(data["images"]) != set(data["chunks"])):
        raise StellarError(f"{path}: damaged kernel record: not a kernel record")
    return KernelRecord(data["name"], data)


def import_kernel(host: Host, path: Path | None, name: str | None = None,
                  initrd: Path | None = None) -> KernelRecord:
    """Register any vmlinux or bzImage (e.g. Debian's /boot/vmlinuz-*), an initrd to boot
    it with, or both; ``volt run --kernel NAME --initrd NAME`` then finds them."""
    if path is None and initrd is None:
        raise UsageError("give a kernel image, an --initrd, or both")
    images: dict[str, Path] = {}
    meta: dict[str, Any] = {"source": "import"}
    if path is not None:
        info = inspect(path)  # refuse non-kernels before touching the store
        images[SLOTS[info.format]] = path
        meta.update(origin=str(Path(path).resolve()), version=info.version)
    if initrd is not None:
        if not initrd.is_file() or initrd.stat().st_size == 0:
            raise UsageError(f"initrd {initrd}: not a non-empty file")
        images[INITRD] = initrd
    name = check_name(name or (path or initrd).name)  # type: ignore[union-attr]
    return register(host, name, images, meta)


def register_build(host: Host, build: KernelBuild, name: str | None = None) -> KernelRecord:
    """Register a built guest kernel with both formats and its build inputs."""
    name = name or f"volt-{build.source_version}-{build.fragment_hash}"
    return register(host, name, {"vmlinux": build.vmlinux, "bzImage": build.bzimage},
                    {"source": "build", "version": build.kernel_release,
                     "source_version": build.source_version,
                     "config_hash": build.fragment_hash})


def list_kernels(host: Host) -> list[KernelRecord]:
    d = _dir(host)
    return [r for p in sorted(d.glob("*.json")) if (r := _read(p)) is not None]


def find(host: Host, ref: str) -> KernelRecord:
    """A kernel by name, or by a unique prefix (8+ hex digits) of one of its image digests."""
    if NAME.fullmatch(ref) and (rec := _read(_dir(host) / f"{ref}.json")) is not None:
        return rec
    if re.fullmatch(r"[0-9a-f]{8,64}", ref):
        hits = [r for r in list_kernels(host) if any(d.startswith(ref) for d in r.digests())]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"digest prefix {ref} is ambiguous: "
                             + ", ".join(r.name for r in hits))
    raise StellarError(f"no kernel named or hashed {ref!r} (see `volt kernel list`)")


def select(host: Host, ref: str, slots: tuple[str, ...]) -> tuple[KernelRecord, str]:
    """The record ``ref`` names and which of its images to use: the one whose digest ``ref``
    prefixes, else the first of ``slots`` it has."""
    rec = find(host, ref)
    for slot in slots:
        if slot in rec.images and rec.images[slot]["digest"].startswith(ref):
            return rec, slot
    for slot in slots:
        if slot in rec.images:
            return rec, slot
    raise UsageError(f"kernel {rec.name} has no {' or '.join(slots)} (it has: "
                     f"{', '.join(rec.images)})")


def read_image(host: Host, rec: KernelRecord, slot: str) -> bytes:
    """Reassemble one image from its chunks and verify its whole-file digest."""
    if slot not in rec.images:
        raise UsageError(f"kernel {rec.name} has no {slot} (it has: "
                         f"{', '.join(rec.images)})")
    img = rec.images[slot]
    data = b"".join(host.store.get(bytes.fromhex(d)) for d, _n in rec.chunks(slot))
    if len(data) != img["size"] or host.hasher.digest(data).hex() != img["digest"]:
        raise StellarError(f"kernel {rec.name} {slot}: reassembled image does not match its "
                           "recorded digest")
    return data


def extract(host: Host, rec: KernelRecord, slot: str, dest: Path) -> Path:
    """Write one verified image to ``dest`` (a file path) and return it."""
    data = read_image(host, rec, slot)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def remove(host: Host, ref: str) -> KernelRecord:
    """Delete a record and release its chunk references (gc reclaims the space)."""
    with _locked(host) as d:
        rec = find(host, ref)
        (d / f"{rec.name}.json").unlink()
        fsync_dir(d)  # durable before the references go
    host.store.release_many(rec.references())
    return rec
