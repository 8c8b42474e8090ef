"""EROFS metadata for a file tree whose file data already lives in NEBULA chunks.

An image's VM form is an uncompressed EROFS filesystem (Linux >= 5.4 mounts it;
the on-disk format is Documentation/filesystems/erofs.rst and erofs_fs.h). We
write the metadata ourselves rather than run mkfs.erofs because the point is
*where the data goes*: every regular file is FLAT_PLAIN, its bytes start on a
4 KiB block of the disk and run on contiguously, so the disk range of a file is
exactly the concatenation of the chunks (or Cosmic Pack slot) the container
form already stores. mkfs.erofs picks its own placement (tail packing into
metadata, its own dedupe), would need the tree extracted first, and would have
to be re-parsed to learn where each byte went.

What is new is only metadata: the superblock, one 64-byte extended inode per
inode (full uid/gid, mtime in ns), inline xattrs, directory blocks, and symlink
targets. Directory and symlink bodies that fit sit inline after their inode
(FLAT_INLINE), the rest in whole blocks. Only features Linux 5.4+ reads are used
(no compression, no chunk indexes, no xattr name filter), so the guest kernel
(6.1) and the host kernel agree.

Layout: ``[superblock + inodes (meta_blkaddr 0)][dir/symlink blocks][file data]``.
:func:`build` returns the metadata bytes (everything before the file data) and
the file data extents; it never reads chunk bytes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from stellarium_core.errors import StellarError
from stellarium_core.volumes.filetree import TYPE_BITS, Entry, Manifest

BLOCK = 4096
BLOCK_BITS = 12
SUPER_OFFSET = 1024
MAGIC = 0xE0F5E1E2
NAME_MAX = 255
LABEL = b"stellarium".ljust(16, b"\0")
#: magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, build_time,
#: build_time_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name,
#: feature_incompat, available_compr_algs, extra_devices, devt_slotoff
SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHH38x")
#: i_format, i_xattr_icount, i_mode, reserved, i_size, i_u, i_ino, i_uid, i_gid,
#: i_mtime, i_mtime_nsec, i_nlink
INODE = struct.Struct("<HHHHQIIIIqII16x")
DIRENT = struct.Struct("<QHBx")        # nid, nameoff, file_type
XATTR_HEAD = struct.Struct("<IB7x")    # reserved, shared count
XATTR_ENTRY = struct.Struct("<BBH")    # name length, name index, value size
SLOT = 32                              # nids count 32-byte slots from meta_blkaddr
FIRST_NID = (SUPER_OFFSET + SUPER.size) // SLOT   # 36: inodes start right after the sb
assert SUPER.size == 128 and INODE.size == 64 and DIRENT.size == 12

LAYOUT_PLAIN, LAYOUT_INLINE = 0, 2
_FORMAT_EXTENDED = 1
_FT = {"file": 1, "dir": 2, "char": 3, "block": 4, "fifo": 5, "socket": 6, "symlink": 7}
#: xattr name prefixes EROFS stores as an index (longest match first), as Linux 6.1 reads them
_XATTR_PREFIXES = (("system.posix_acl_access", 2), ("system.posix_acl_default", 3),
                   ("user.", 1), ("trusted.", 4), ("lustre.", 5), ("security.", 6))
_MAX_XATTR_BODY = BLOCK - INODE.size   # inode + inline xattrs stay within one block

#: A regular file's bytes as (chunk digest, offset in chunk, length) pieces, in order.
Pieces = list[tuple[bytes, int, int]]


class ErofsError(StellarError):
    """The tree has an entry the VM disk cannot represent; the message names it."""


def _fail(e: Entry, why: str) -> ErofsError:
    return ErofsError(f"entry {e.path!r}: {why}")


@dataclass
class _Inode:
    entry: Entry
    ino: int
    nlink: int = 1
    xattrs: bytes = b""
    body: bytes = b""            # directory blocks or symlink target (metadata payload)
    pieces: Pieces = field(default_factory=list)
    children: list[tuple[bytes, _Inode]] = field(default_factory=list)
    nid: int = 0
    layout: int = LAYOUT_PLAIN
    blkaddr: int = 0
    inline: bytes = b""

    @property
    def kind(self) -> str:
        return self.entry.type

    @property
    def size(self) -> int:
        if self.kind == "file":
            return self.entry.size
        return len(self.body)

    @property
    def record(self) -> int:
        """Bytes of the inode slot: inode, inline xattrs, inline tail."""
        return INODE.size + len(self.xattrs) + len(self.inline)


@dataclass
class Layout:
    """A built disk: ``meta`` is disk bytes ``0 .. len(meta)``; ``extents`` are
    (disk offset, chunk digest, offset in chunk, length) of file data, in order."""

    size: int
    meta: bytearray
    extents: list[tuple[int, bytes, int, int]]


def _name(e: Entry) -> bytes:
    name = os.fsencode(e.path.rpartition("/")[2])
    if not 0 < len(name) <= NAME_MAX or b"\0" in name or b"/" in name:
        raise _fail(e, f"its name is {len(name)} bytes or holds NUL or '/' "
                       f"(EROFS names are 1..{NAME_MAX} bytes)")
    return name


def _xattr_body(e: Entry) -> bytes:
    """The inline xattr area (header + entries, 4-byte aligned) or b''."""
    if not e.xattrs:
        return b""
    out = bytearray(XATTR_HEAD.pack(0, 0))
    for key in sorted(e.xattrs):
        value = e.xattrs[key]
        known = next(((p, i) for p, i in _XATTR_PREFIXES if key.startswith(p)), None)
        if known is None:
            raise _fail(e, f"xattr {key!r} is in a namespace the VM disk cannot hold "
                           "(user., trusted., security., lustre., system.posix_acl_*)")
        prefix, index = known
        suffix = os.fsencode(key[len(prefix):])
        if (not suffix and index not in (2, 3)) or len(suffix) > NAME_MAX:
            raise _fail(e, f"xattr name {key!r} is empty or too long after its prefix")
        if len(value) > 0xFFFF:
            raise _fail(e, f"xattr {key!r} has a {len(value)}-byte value (max 65535)")
        item = XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        out += item + bytes(-len(item) % 4)
    if len(out) > _MAX_XATTR_BODY:
        raise _fail(e, f"its xattrs take {len(out)} bytes on disk; the VM disk keeps them "
                       f"inline, at most {_MAX_XATTR_BODY}")
    return bytes(out)


def _rdev(e: Entry) -> int:
    """Linux's 32-bit new_encode_dev() of the entry's device number."""
    rdev = e.rdev or 0
    major, minor = os.major(rdev), os.minor(rdev)
    if major >= 1 << 12 or minor >= 1 << 20:
        raise _fail(e, f"device number {major}:{minor} does not fit a 32-bit dev_t")
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _dir_blocks(children: list[tuple[bytes, _Inode]]) -> list[list[tuple[bytes, _Inode]]]:
    """Dirents grouped into blocks, names sorted bytewise across the whole directory
    (lookup bisects the first name of each block, then inside a block)."""
    blocks: list[list[tuple[bytes, _Inode]]] = [[]]
    used = 0
    for name, node in sorted(children, key=lambda c: c[0]):
        need = DIRENT.size + len(name)
        if used + need > BLOCK:
            blocks.append([])
            used = 0
        blocks[-1].append((name, node))
        used += need
    return blocks


def _dir_body(blocks: list[list[tuple[bytes, _Inode]]]) -> bytes:
    """Directory bytes: full blocks zero padded, the last one exactly as long as its use."""
    out = bytearray()
    for i, block in enumerate(blocks):
        names = DIRENT.size * len(block)
        raw = bytearray()
        tail = bytearray()
        for name, node in block:
            raw += DIRENT.pack(node.nid, names + len(tail), _FT[node.kind])
            tail += name
        raw += tail
        out += raw if i == len(blocks) - 1 else raw.ljust(BLOCK, b"\0")
    return bytes(out)


def _tree(manifest: Manifest, pieces: Callable[[Entry], Pieces]) -> list[_Inode]:
    """Inodes in manifest order (root first), hardlinks folded into their target."""
    entries = list(manifest)
    if not entries or entries[0].path != "." or entries[0].type != "dir":
        raise ErofsError("the tree does not start with its root directory")
    nodes: list[_Inode] = []
    by_path: dict[str, _Inode] = {}
    for e in entries:
        if e.path in by_path:
            raise _fail(e, "appears twice in the tree")
        parent: _Inode | None = None
        if e.path != ".":
            parent = by_path.get(e.path.rpartition("/")[0] or ".")
            if parent is None or parent.kind != "dir":
                raise _fail(e, "its parent directory is not in the tree")
        if e.type == "hardlink":
            node = by_path.get(e.target or "")
            if node is None or node.kind == "dir":
                raise _fail(e, f"hardlink target {e.target!r} is not an earlier non-directory")
            node.nlink += 1
        else:
            if e.type not in _FT:
                raise _fail(e, f"type {e.type!r} has no EROFS inode")
            if not (0 <= e.uid < 1 << 32 and 0 <= e.gid < 1 << 32 and 0 <= e.mode < 1 << 12):
                raise _fail(e, f"uid {e.uid}, gid {e.gid} or mode {e.mode:#o} is out of range")
            node = _Inode(e, ino=len(nodes) + 1, xattrs=_xattr_body(e))
            if e.type == "file":
                node.pieces = pieces(e)
                if sum(n for _, _, n in node.pieces) != e.size:
                    raise _fail(e, f"its data pieces do not add up to its size {e.size}")
            elif e.type == "symlink":
                node.body = os.fsencode(e.target or "")
                if not 0 < len(node.body) < BLOCK:
                    raise _fail(e, f"symlink target of {len(node.body)} bytes "
                                   f"(1..{BLOCK - 1} allowed)")
            elif e.type in ("char", "block"):
                _rdev(e)
            elif e.type == "dir":
                node.nlink = 2
            nodes.append(node)
        if parent is not None:
            parent.children.append((_name(e), node))
            if node.kind == "dir":
                parent.nlink += 1
        by_path[e.path] = node
    return nodes


def _place(nodes: list[_Inode]) -> tuple[int, int]:
    """Give every inode a nid and decide inline vs plain bodies; returns (end of the
    inode area, number of body blocks needed after it)."""
    pos, body_blocks = FIRST_NID * SLOT, 0
    for node in nodes:
        tail = node.size % BLOCK if node.kind in ("dir", "symlink") else 0
        node.layout = LAYOUT_PLAIN
        if tail and INODE.size + len(node.xattrs) + tail <= BLOCK:
            node.layout = LAYOUT_INLINE
            node.inline = bytes(tail)           # placeholder of the right length
        pos += -pos % SLOT
        if pos // BLOCK != (pos + node.record - 1) // BLOCK:
            pos += -pos % BLOCK
        node.nid = pos // SLOT
        pos += node.record
        if node.kind in ("dir", "symlink"):
            full = node.size // BLOCK if node.layout == LAYOUT_INLINE else -(-node.size // BLOCK)
            body_blocks += full
    return pos, body_blocks


def build(manifest: Manifest, pieces: Callable[[Entry], Pieces], *,
          uuid: bytes = bytes(16)) -> Layout:
    """The EROFS disk of ``manifest``: metadata bytes plus file data extents.

    ``pieces(entry)`` says where a regular file's bytes are. Raises
    :class:`ErofsError` naming the first entry EROFS cannot represent.
    """
    nodes = _tree(manifest, pieces)
    parents = {id(child): node for node in nodes if node.kind == "dir"
               for _, child in node.children if child.kind == "dir"}

    def dir_body(node: _Inode) -> bytes:
        up = parents.get(id(node), node)
        return _dir_body(_dir_blocks(node.children + [(b".", node), (b"..", up)]))

    # Directory sizes depend on names only: size them, place every inode, then
    # encode the directories again with the nids now known.
    for node in nodes:
        if node.kind == "dir":
            node.body = dir_body(node)
    meta_end, body_blocks = _place(nodes)
    # fsck.erofs (1.5) reads an xattr header after every inode, with or without
    # xattrs: keep that many readable bytes after the last one.
    body_start = -(-(meta_end + XATTR_HEAD.size) // BLOCK)
    data_block = body_start + body_blocks
    next_body = body_start
    meta = bytearray(data_block * BLOCK)
    extents: list[tuple[int, bytes, int, int]] = []
    for node in nodes:
        e = node.entry
        if node.kind == "dir":
            node.body = dir_body(node)
        size, i_u = node.size, 0
        if node.kind == "file":
            i_u = data_block if size else 0
            off = data_block * BLOCK
            for digest, start, n in node.pieces:
                extents.append((off, digest, start, n))
                off += n
            data_block += -(-size // BLOCK)
        elif node.kind in ("dir", "symlink"):
            full = size - len(node.inline)
            if node.layout == LAYOUT_INLINE:
                node.inline = node.body[full:]
            if full or node.layout == LAYOUT_PLAIN:
                i_u = next_body
                meta[next_body * BLOCK:next_body * BLOCK + full] = node.body[:full]
                next_body += -(-full // BLOCK)
        elif node.kind in ("char", "block"):
            i_u = _rdev(e)
        mode = TYPE_BITS[e.type] | e.mode
        sec, nsec = divmod(e.mtime_ns, 10**9)
        icount = (len(node.xattrs) - XATTR_HEAD.size) // 4 + 1 if node.xattrs else 0
        fmt = _FORMAT_EXTENDED | node.layout << 1
        pos = node.nid * SLOT
        record = (INODE.pack(fmt, icount, mode, 0, size, i_u, node.ino, e.uid, e.gid, sec,
                             nsec, node.nlink) + node.xattrs + node.inline)
        meta[pos:pos + len(record)] = record
    root = nodes[0]                      # placed first: nid 36, fits the 16-bit root_nid
    if data_block >= 1 << 32:
        raise ErofsError(f"the disk needs {data_block} blocks; EROFS addresses 2^32")
    sec, nsec = divmod(root.entry.mtime_ns, 10**9)
    meta[SUPER_OFFSET:SUPER_OFFSET + SUPER.size] = SUPER.pack(
        MAGIC, 0, 0, BLOCK_BITS, 0, root.nid, len(nodes), max(sec, 0), nsec, data_block,
        0, 0, uuid[:16].ljust(16, b"\0"), LABEL, 0, 0, 0, 0)
    return Layout(size=data_block * BLOCK, meta=meta, extents=extents)
