"""Garbage collection and consistency checking of a :class:`ChunkStore`.

Both hold the store lock for their whole run, so writers in other processes wait
rather than race a pack rewrite or an index compaction.
"""

from __future__ import annotations

import bisect
import mmap
import os
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from stellarium_core.errors import StellarError
from stellarium_core.fsutil import fsync_dir
from stellarium_core.nebula.errors import ChunkError
from stellarium_core.nebula.format import (
    DEL,
    PUT,
    RECORD_PREFIX,
    RECORD_SIZE,
    REF,
    ChunkRecord,
    align,
    log_record,
    pack_name,
    parse_record,
)
from stellarium_core.nebula.packs import footprint
from stellarium_core.nebula.pending import sweep
from stellarium_core.nebula.table import PAGE, UNIT, Entry

if TYPE_CHECKING:
    from stellarium_core.nebula.store import ChunkStore


def collect(s: ChunkStore, keep: Callable[[], Collection[bytes]] | None = None
            ) -> dict[str, int]:
    """Release dead operations' journals, forget chunks with no references (never
    one ``keep()``, asked after that release, returns), rewrite packs that are
    >= 20% garbage; leave every pack a mapping leases as it is."""
    index, packs = s.index, s.packs
    claims: dict[int, int | None] = {}

    def ours(n: int) -> bool:
        """Whether no mapping leases pack ``n`` (claimed for the rest of this gc)."""
        if n not in claims:
            try:
                claims[n] = packs.claim(n)
            except FileNotFoundError:
                claims[n] = None
        return claims[n] is not None

    with s.lock():
        damage = index.damaged() or [f"{f}: {what}" for f, _, what in index.damage]
        if damage:
            raise ChunkError(f"gc refused: the index of {s.root} was damaged ({damage[0]}) and "
                             "is not repaired; gc would drop chunks it forgot. Run "
                             "`stellar fsck --repair` first")
        try:
            return _collect(s, keep, ours)
        finally:
            for fd in claims.values():
                if fd is not None:
                    os.close(fd)


def _collect(s: ChunkStore, keep: Callable[[], Collection[bytes]] | None,
             ours: Callable[[int], bool]) -> dict[str, int]:
    index, packs = s.index, s.packs
    released = sweep(s)
    named = keep() if keep is not None else ()
    t = index.table
    unused = [(d, e) for d, e in t.items() if e.refs == 0 and d not in named]
    dead = [(d, e) for d, e in unused if ours(e.pack)]
    kept = sum(1 for d, e in t.items() if e.refs == 0 and d in named)
    if dead:
        index.append([log_record(DEL, d) for d, _ in dead])
        for _, e in dead:
            packs.punch(e)
    by_pack: dict[int, list[tuple[bytes, Entry]]] = defaultdict(list)
    live: dict[int, int] = defaultdict(int)
    for d, e in t.items():
        by_pack[e.pack].append((d, e))
        live[e.pack] += footprint(e)
    numbers = packs.numbers()
    sizes = {n: packs.path(n).stat().st_size for n in numbers}
    victims = [n for n in numbers
               if sizes[n] - live[n] >= max(PAGE, sizes[n] // 5) and ours(n)]
    target = (numbers[-1] + 1) if numbers else 1
    moved = 0
    wrote_new = False
    for n in victims:
        chunks = sorted(by_pack.get(n, []), key=lambda de: de[1].offset)
        if not chunks:
            continue
        mm = packs.map(n, max(e.offset + e.stored for _, e in chunks))
        view = memoryview(mm)
        items = [(d, view[e.offset:e.offset + e.stored], e.raw, e.flags, e.codec)
                 for d, e in chunks]
        places, undo = packs.write(items, first_pack=target)
        target = places[-1][0]
        wrote_new = True
        try:
            index.append([log_record(PUT, d, p, o, e.stored, e.raw, 0, e.flags, e.codec)
                          for (d, e), (p, o) in zip(chunks, places, strict=True)])
        except OSError:
            packs.cut_back(undo)
            raise
        moved += len(chunks)
        del items, view
    index.compact()
    removed = 0
    reclaimed = 0
    for n in victims:
        # Pack numbers are never reused: keep the newest pack unless a newer one exists.
        if n == numbers[-1] and not wrote_new:
            continue
        packs.drop(n)
        os.unlink(packs.path(n))
        removed += 1
        reclaimed += sizes[n] - live[n]
    if removed:
        fsync_dir(packs.dir)
    return {"chunks_removed": len(dead), "chunks_moved": moved,
            "packs_removed": removed, "bytes_reclaimed": reclaimed,
            "journals_released": released, "unreferenced_but_named": kept,
            "unreferenced_but_mapped": len(unused) - len(dead)}


@dataclass(frozen=True)
class Problem:
    """One finding: ``error`` is damage; ``warning`` and ``note`` are harmless."""

    severity: str
    file: str
    what: str
    chunk: str | None = None
    offset: int | None = None

    def __str__(self) -> str:
        where = self.file + (f" @{self.offset}" if self.offset is not None else "")
        who = f" chunk {self.chunk}:" if self.chunk else ""
        return f"{self.severity}: {where}:{who} {self.what}"


@dataclass
class FsckReport:
    """What fsck checked and found; only ``error`` problems (after a repair: the ones
    it did not fix) make it not ``ok`` (exit 1)."""

    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: int = 0
    #: After a repair: the errors a second check still found (None: no repair ran).
    remaining: list[Problem] | None = None

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not (self.errors if self.remaining is None else self.remaining)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"ok": self.ok, "chunks": self.chunks, "bytes": self.bytes,
                                  "repaired": self.repaired,
                                  "problems": [p.__dict__ for p in self.problems]}
        if self.remaining is not None:
            out["remaining"] = [p.__dict__ for p in self.remaining]
        return out


def fsck(s: ChunkStore, repair: bool = False, held: Mapping[bytes, int] | None = None,
         complete: bool = True) -> FsckReport:
    """Re-hash every indexed chunk; cross-check index records, pack trailers and files.

    ``held`` is what every manifest and record of the store accounts for, per
    chunk: then a chunk it names that the index lacks, or that has fewer
    references than that, is an error, and one with more is a leak (reported
    only when the census is ``complete``, i.e. no holder was unreadable). With
    ``repair``, intact chunks found in packs are indexed again and every count
    set to ``held`` (raised always, lowered only from a complete census), and
    the index damage mark is cleared; without ``held`` a re-indexed chunk gets
    one reference and the mark stays, so ``gc`` keeps refusing.
    """
    rep = FsckReport()
    add = rep.problems.append
    log = "index.log"
    index = s.index
    with s.lock(writing=repair):
        index.replay()           # from scratch, to see every damaged record
        for file, off, what in index.damage:
            add(Problem("error", file, what, offset=off))
        torn = index.torn_tail()
        if index.stale:          # missing or damaged header: reported as damage above
            if not any(f == log for f, _, _ in index.damage):
                add(Problem("warning", log, "older than index.snap (a compaction was "
                            "interrupted); ignored, and replaced by the next write"))
        elif torn is not None:
            add(Problem("warning", log, f"{torn[1]} bytes of torn records at the end "
                        "(an interrupted append; ignored)", offset=torn[0]))
        entries = list(index.table.items())
        regions: dict[int, list[tuple[int, int]]] = defaultdict(list)
        bad: set[bytes] = set()
        rewrite: list[tuple[bytes, Entry, bytes]] = []
        packs = set(s.pack_numbers())
        sizes = {n: s.pack_path(n).stat().st_size for n in packs}
        maps: dict[int, mmap.mmap] = {}
        for d, e in entries:
            rep.chunks += 1
            pname = pack_name(e.pack)
            regions[e.pack].append((e.offset, e.offset + footprint(e) - (
                RECORD_SIZE if e.mappable else 0)))
            err, content = _check_chunk(s, d, e, sizes, maps)
            if err:
                bad.add(d)
                if content is not None:   # its bytes are intact: a fresh copy fixes it
                    rewrite.append((d, e, content))
                add(Problem("error", f"packs/{pname}", err + (
                    "; its content is intact" + ("" if repair else
                                                 " (`stellar fsck --repair` writes a copy)")
                    if content is not None else ""), d.hex(), e.offset))
            else:
                rep.bytes += e.raw
        for mm in maps.values():
            mm.close()
        unreferenced = sum(1 for _, e in entries if e.refs == 0)
        if unreferenced:
            add(Problem("note", log, f"{unreferenced} chunks have no references left "
                        "(`stellar gc` reclaims them)"))
        found, records = _scan_packs(s, packs, regions, rep)
        for d, e in entries:   # a mappable chunk's record lies elsewhere: found by the scan
            if e.mappable and d not in bad and (e.pack, e.offset) not in records:
                bad.add(d)
                rewrite.append((d, e, bytes(_content(s, e))))
                add(Problem("error", f"packs/{pack_name(e.pack)}", "its record is missing or "
                            "damaged; its content is intact" + ("" if repair else
                            " (`stellar fsck --repair` writes a copy)"), d.hex(), e.offset))
        if held is not None:
            _check_counts(s, held, complete, found, rep)
        repair_records = []
        for d, (pack, r) in found.items():
            if d in bad:
                if repair:
                    repair_records.append(log_record(PUT, d, pack, r.offset, r.stored, r.raw,
                                                     0, r.flags, r.codec))
                add(Problem("warning", f"packs/{pack_name(pack)}",
                            "an intact copy of a damaged chunk is here"
                            + ("; index now points to it" if repair else
                               " (`stellar fsck --repair` re-points the index)"),
                            d.hex(), r.offset))
            elif index.table.get(d) is None:
                refs = 1 if held is None else held.get(d, 0)
                if repair:
                    repair_records.append(log_record(PUT, d, pack, r.offset, r.stored, r.raw,
                                                     refs, r.flags, r.codec))
                if held is None or d not in held:  # else reported as missing above
                    add(Problem("warning", f"packs/{pack_name(pack)}",
                                "unindexed chunk, left by an interrupted write or a lost index "
                                "record" + (f"; indexed again with {refs} references" if repair
                                            else " (`stellar fsck --repair` indexes it)"),
                                d.hex(), r.offset))
        if repair:
            repair_records += _rewrite(s, [x for x in rewrite if x[0] not in found])
        if repair_records:
            index.append(repair_records)
            rep.repaired = len(repair_records)
        if repair and held is not None:
            rep.repaired += _recount(s, held, complete)
        if repair and (rep.repaired or index.damage):
            index.compact()   # a fresh snapshot: the damaged index files are replaced
        if repair and held is not None:
            s.damage_path.unlink(missing_ok=True)
    return rep


def _check_counts(s: ChunkStore, held: Mapping[bytes, int], complete: bool,
                  found: dict[bytes, tuple[int, ChunkRecord]], rep: FsckReport) -> None:
    """Compare the index's reference counts with what the holders account for."""
    add = rep.problems.append
    table = s.index.table
    for d, n in held.items():
        e = table.get(d)
        if e is None:
            copy = found.get(d)
            add(Problem("error", "index", (
                f"named by a manifest but not in the index; an intact copy is in "
                f"packs/{pack_name(copy[0])} (`stellar fsck --repair` indexes it)" if copy else
                "named by a manifest but in no index entry and no pack: its data is lost"),
                d.hex()))
        elif e.refs < n:
            add(Problem("error", "index", f"{e.refs} references but manifests account for "
                        f"{n}: releasing one would free it while still in use "
                        "(`stellar fsck --repair` recounts)", d.hex()))
    if not complete:
        return
    extra = [(d, e.refs - held.get(d, 0)) for d, e in table.items() if e.refs > held.get(d, 0)]
    if extra:
        orphans = sum(1 for d, _ in extra if d not in held)
        add(Problem("warning", "index", f"{len(extra)} chunks hold {sum(n for _, n in extra)} "
                    f"references no manifest accounts for ({orphans} named by none): leaked by "
                    "interrupted operations; `stellar fsck --repair` recounts, then `stellar "
                    "gc` reclaims what nothing uses"))


def _recount(s: ChunkStore, held: Mapping[bytes, int], complete: bool) -> int:
    """Set every count to what the holders account for; how many changed."""
    records = []
    for d, e in s.index.table.items():
        want = held.get(d, 0)
        if e.refs < want or (e.refs > want and complete):
            records.append(log_record(REF, d, delta=want - e.refs))
    if records:
        s.index.append(records)
    return len(records)


def _rewrite(s: ChunkStore, chunks: list[tuple[bytes, Entry, bytes]]) -> list[bytes]:
    """Write fresh copies of chunks whose bytes are intact but whose record or
    placement is not; the index records that point to them."""
    if not chunks:
        return []
    items = []
    for d, e, content in chunks:
        stored, codec = (content, "") if e.mappable else s.compress(content)
        items.append((d, stored, e.raw, e.flags, codec))
    places, _ = s.packs.write(items)
    return [log_record(PUT, d, p, o, len(stored), raw, 0, flags, codec)
            for (d, stored, raw, flags, codec), (p, o) in zip(items, places, strict=True)]


def _check_chunk(s: ChunkStore, d: bytes, e: Entry, sizes: dict[int, int],
                 maps: dict[int, mmap.mmap]) -> tuple[str | None, bytes | None]:
    """(what is wrong with one indexed chunk or None, its content if intact)."""
    if e.pack not in sizes:
        return f"its pack file {pack_name(e.pack)} is missing", None
    end = e.offset + (align(e.stored, PAGE) if e.mappable else e.stored + RECORD_SIZE)
    if sizes[e.pack] < end:
        return f"pack is truncated: {sizes[e.pack]} bytes, the chunk ends at {end}", None
    mm = maps.get(e.pack)
    if mm is None:
        with open(s.pack_path(e.pack), "rb") as fh:
            mm = maps[e.pack] = mmap.mmap(fh.fileno(), sizes[e.pack], access=mmap.ACCESS_READ)
    if e.mappable:
        return _check_mappable(s, d, e, sizes[e.pack], mm)
    r = parse_record(mm, e.offset + e.stored)
    if r is None:
        what = "its record is damaged"
    elif r != ChunkRecord(d, e.offset, e.stored, e.raw, e.flags, e.codec):
        what = "its record does not match the index record"
    else:
        what = ""
    data = mm[e.offset:e.offset + e.stored]
    if e.codec:
        try:
            data = s.decompress(d, e, data)
        except ChunkError as exc:
            return str(exc) + (f"; {what}" if what else ""), None
    if s.hasher.digest(data) != d:
        return "content does not hash to its digest (corrupt bytes)" + (
            f"; {what}" if what else ""), None
    return (what, data) if what else (None, None)


def _check_mappable(s: ChunkStore, d: bytes, e: Entry, size: int,
                    mm: mmap.mmap) -> tuple[str | None, bytes | None]:
    """What keeps a chunk marked mappable from being mapped or read, or None."""
    content = mm[e.offset:e.offset + e.stored]
    if s.hasher.digest(content) != d or e.stored != e.raw:
        return "content does not hash to its digest (corrupt bytes)", None
    if e.offset % PAGE or e.codec:
        return "is marked mappable but is not page-aligned and raw", content
    if mm[e.offset + e.stored:e.offset + align(e.stored, PAGE)].count(0) != (
            align(e.stored, PAGE) - e.stored):
        return "its last page holds other bytes after it (a mapping would show them)", content
    return None, None


def _content(s: ChunkStore, e: Entry) -> bytes | memoryview:
    """An indexed chunk's stored bytes (checked by ``_check_chunk`` already)."""
    return s.packs.map(e.pack, e.offset + e.stored)[e.offset:e.offset + e.stored]


def _scan_packs(s: ChunkStore, packs: set[int], regions: dict[int, list[tuple[int, int]]],
                rep: FsckReport) -> tuple[dict[bytes, tuple[int, ChunkRecord]],
                                          set[tuple[int, int]]]:
    """Chunks with a valid record and content outside every indexed region, and the
    (pack, offset) of every valid record of an indexed chunk outside them (those
    of mappable chunks)."""
    found: dict[bytes, tuple[int, ChunkRecord]] = {}
    records: set[tuple[int, int]] = set()
    table = s.index.table
    for n in sorted(packs):
        path = s.pack_path(n)
        with open(path, "rb") as fh:
            length = os.fstat(fh.fileno()).st_size
            if not length:
                continue
            data = mmap.mmap(fh.fileno(), length, access=mmap.ACCESS_READ)
        spans = sorted(regions.get(n, []))
        starts = [a for a, _ in spans]
        used = list(spans)
        pos = data.find(RECORD_PREFIX)
        while pos >= 0:
            i = bisect.bisect_right(starts, pos) - 1
            inside = i >= 0 and pos < spans[i][1]   # an indexed record, or chunk content
            r = None if inside else parse_record(data, pos)
            e = table.get(r.digest) if r is not None else None
            if r is not None and e is not None and (e.pack, e.offset, e.stored) == (
                    n, r.offset, r.stored):
                records.add((n, r.offset))    # checked with the index entry
                used.append((pos, pos + RECORD_SIZE))
            elif (r is not None and r.offset % UNIT == 0 and 0 <= r.offset
                    and r.offset + r.stored <= pos and r.digest not in found):
                content: bytes | None = data[r.offset:r.offset + r.stored]
                if r.codec:
                    try:
                        content = s.compressors(r.codec).decompress(content, r.raw)
                    except (ValueError, StellarError):  # unknown compressor, damaged bytes
                        content = None
                if content is not None and s.hasher.digest(content) == r.digest:
                    found[r.digest] = (n, r)
            pos = data.find(RECORD_PREFIX, pos + 1)
        data.close()
        orphan = _unused(sorted(used), length)
        if orphan > 0:
            rep.problems.append(Problem(
                "note", f"packs/{pack_name(n)}",
                f"{orphan} bytes (padding excluded) hold no indexed chunk: freed chunks or "
                "crash leftovers; harmless, `stellar gc` rewrites packs that are mostly so"))
    return found, records


def _unused(spans: list[tuple[int, int]], length: int) -> int:
    """Bytes of a pack outside ``spans`` (sorted), not counting alignment: up to 63
    bytes before any span, up to a page before a page-aligned one, and a short tail."""
    unused, end = 0, 0
    for a, b in spans + [(length, length)]:
        gap = a - end
        if gap >= (PAGE if a % PAGE == 0 else UNIT):
            unused += gap
        end = max(end, b)
    return unused
