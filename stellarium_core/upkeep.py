"""Store-wide ``fsck`` and ``gc``: NEBULA plus everything that holds its references.

NEBULA alone can check its packs and index, but not whether its reference
counts are right: that takes a census of every manifest and record above it
(:mod:`stellarium_core.holders`). So ``stellar fsck`` runs both, and ``--repair``
re-indexes chunks found in packs and sets every count from the census; ``stellar
gc`` sweeps what dead operations left (scratch trees, reference journals) and
never drops a chunk a holder names.

Counts are only checked, and only repaired, when no other process has the store
open: an operation elsewhere may be between taking references and writing the
manifest that holds them, and a census then would undercount it.
"""

from __future__ import annotations

from typing import Any

from stellarium_core.distribution.importer import SCRATCH
from stellarium_core.errors import StellarError
from stellarium_core.fsutil import sweep_unclaimed
from stellarium_core.holders import census, set_aside
from stellarium_core.host import Host
from stellarium_core.nebula import ChunkStore
from stellarium_core.nebula.maintenance import FsckReport, Problem


def fsck(host: Host, repair: bool = False) -> FsckReport:
    """Check (and with ``repair`` fix) the whole store; runs even when NEBULA's own
    metadata or index files are damaged, saying so."""
    root = host.store_path / "nebula"
    meta = ChunkStore.meta_problem(root, host.hasher) if (root / "index.log").exists() or \
        (root / "nebula.json").exists() else None
    if meta and repair:
        ChunkStore.write_meta(root, host.hasher)
    store = ChunkStore.open(root, host.hasher, **host.store_options(), check_meta=False)
    with store, store.exclusive() as alone:
        if repair and not alone:
            raise StellarError(f"fsck --repair needs the store {host.store_path} to itself, "
                               "but other processes have it open (VMs, containers, pulls, "
                               "ingests); stop them and run it again")
        c = census(host.store_path, host.hasher)
        moved = set_aside(c) if repair else []
        rep = store.fsck(repair=repair, held=c.held if alone else None, complete=c.complete)
    extra = []
    if meta:
        extra.append(Problem("warning" if repair else "error", "nebula.json",
                             meta + ("; rewritten" if repair else
                                     " (`stellar fsck --repair` rewrites it)")))
    for p, why in c.damaged.items():
        rel = str(p.relative_to(host.store_path))
        if p.name.endswith(".damaged"):
            extra.append(Problem("warning", rel, why))
        else:
            extra.append(Problem("error", rel, why + (
                "; set aside as *.damaged" if repair else
                "; the chunks it held keep their references (`stellar fsck --repair` sets "
                "it aside)")))
    if not alone:
        extra.append(Problem("note", "index", "reference counts were not checked: other "
                             "processes have the store open"))
    rep.problems[:0] = extra
    rep.repaired += len(moved) + (1 if meta and repair else 0)
    if repair:  # what a fresh check still finds is what the repair could not fix
        rep.remaining = fsck(host).errors
    return rep


def gc(host: Host) -> dict[str, Any]:
    """Sweep what dead operations left, then NEBULA's gc, keeping every named chunk."""
    scratch = sweep_unclaimed(host.store_path / "images", SCRATCH)
    out = host.store.gc(keep=lambda: census(host.store_path, host.hasher).held.keys())
    out["scratch_removed"] = scratch
    return out
