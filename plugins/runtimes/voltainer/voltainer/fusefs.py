"""A read-only FUSE filesystem that serves an image's file tree from NEBULA chunks.

The container's lower layer is this view: nothing is extracted. ``getattr`` and
``readdir`` answer from the in-memory tree; ``read`` maps a byte range onto the
file's chunk list and reads only those chunks through the host's PHOTON router:
a chunk is verified and decompressed once per host, then served from the shared
hot tier (to this view, other containers and VMs alike).

fusepy (ctypes over Debian's libfuse2) was chosen over pyfuse3: it installs as
pure Python with no compiler or libfuse3-dev, and its thread-per-request loop
is enough for a container root, where the kernel page cache absorbs re-reads.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from fuse import FUSE, FuseOSError, Operations

from stellarium_core.hookspecs import Hasher
from stellarium_core.nebula import cosmic
from stellarium_core.volumes import filetree
from stellarium_core.volumes.tinyvol import ManifestError


@dataclass
class Node:
    """One path of the view: its metadata and, for regular files, its chunk list."""

    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: str = ""
    chunks: list[tuple[bytes, int]] = field(default_factory=list)  # (digest, length)
    packed: tuple[bytes, int, bytes] | None = None  # Cosmic Pack (digest, slot, file hash)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    ino: int = 0
    nlink: int = 1
    children: dict[str, Node] | None = None
    starts: list[int] | None = None  # file offset of each chunk, built on first read


class Tree:
    """Paths -> nodes, with a directory skeleton so lookups are dict hits."""

    def __init__(self) -> None:
        self.root = Node(mode=stat.S_IFDIR | 0o755, children={}, ino=1, nlink=2)
        self._next_ino = 2

    def add(self, path: str, node: Node) -> None:
        """Insert ``node`` at ``path`` (parents must exist; ``/`` replaces the root's metadata)."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            node.children, node.ino = self.root.children or {}, 1
            self.root = node
            return
        parent = self.lookup("/" + "/".join(parts[:-1]))
        if parent is None or parent.children is None:
            raise ManifestError(f"parent of {path!r} is not a directory in the tree")
        if stat.S_ISDIR(node.mode) and node.children is None:
            node.children = {}
        if not node.ino:
            node.ino = self._next_ino
            self._next_ino += 1
        parent.children[parts[-1]] = node

    def lookup(self, path: str) -> Node | None:
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if node.children is None:
                return None
            node = node.children.get(part)
            if node is None:
                return None
        return node

    def finish(self) -> None:
        """Set directory link counts (2 + subdirectories), as ``find`` and overlayfs expect."""
        stack = [self.root]
        while stack:
            d = stack.pop()
            subdirs = [c for c in d.children.values() if c.children is not None]
            d.nlink = 2 + len(subdirs)
            stack.extend(subdirs)


def tree_from_manifest(manifest: filetree.Manifest) -> Tree:
    """The view of a (stacked) tree manifest; hardlinks share one node, as one inode."""
    tree = Tree()
    for e in manifest:
        if e.type == "hardlink":
            node = tree.lookup(e.target or "")
            if node is None:
                raise ManifestError(f"hardlink {e.path!r} -> missing {e.target!r}")
            node.nlink += 1
            parent, _, name = ("/" + e.path).rpartition("/")
            dirnode = tree.lookup(parent or "/")
            if dirnode is None or dirnode.children is None:
                raise ManifestError(f"parent of {e.path!r} is not a directory")
            dirnode.children[name] = node
            continue
        node = Node(mode=filetree.TYPE_BITS[e.type] | e.mode, uid=e.uid, gid=e.gid,
                    size=e.size if e.type == "file" else len(os.fsencode(e.target or "")),
                    mtime_ns=e.mtime_ns, rdev=e.rdev or 0, target=e.target or "",
                    chunks=e.chunks, xattrs=dict(e.xattrs))
        if e.pack is not None and e.slot is not None and e.hash is not None:
            node.packed = (e.pack, e.slot, e.hash)
        tree.add("/" if e.path == "." else "/" + e.path, node)
    return tree


Reader = Callable[[bytes], "bytes | memoryview"]


def read_range(node: Node, offset: int, size: int, chunk: Reader) -> bytes:
    """Bytes ``[offset, offset+size)`` of a file, from only the chunks that cover them."""
    if offset >= node.size or size <= 0:
        return b""
    if node.starts is None:
        starts, pos = [], 0
        for _digest, length in node.chunks:
            starts.append(pos)
            pos += length
        node.starts = starts
    end = min(node.size, offset + size)
    i = bisect.bisect_right(node.starts, offset) - 1
    out = bytearray()
    while i < len(node.chunks) and node.starts[i] < end:
        digest, length = node.chunks[i]
        lo = max(offset, node.starts[i]) - node.starts[i]
        hi = min(end, node.starts[i] + length) - node.starts[i]
        out += memoryview(chunk(digest))[lo:hi]
        i += 1
    return bytes(out)


class TreeFS(Operations):
    """fusepy operations over a :class:`Tree`; every mutating call fails with EROFS."""

    use_ns = True  # fusepy: times are integer nanoseconds, so mtimes survive exactly

    def __init__(self, tree: Tree, chunk: Reader, hasher: Hasher) -> None:
        self.tree, self.chunk, self.hasher = tree, chunk, hasher

    def _node(self, path: str) -> Node:
        node = self.tree.lookup(path)
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        n = self._node(path)
        return {
            "st_mode": n.mode, "st_ino": n.ino, "st_nlink": n.nlink, "st_uid": n.uid,
            "st_gid": n.gid, "st_size": n.size, "st_rdev": n.rdev,
            "st_mtime": n.mtime_ns, "st_ctime": n.mtime_ns, "st_atime": n.mtime_ns,
            "st_blocks": (n.size + 511) // 512,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        n = self._node(path)
        if n.children is None:
            raise FuseOSError(errno.ENOTDIR)
        return [".", "..", *n.children]

    def readlink(self, path: str) -> str:
        n = self._node(path)
        if not stat.S_ISLNK(n.mode):
            raise FuseOSError(errno.EINVAL)
        return n.target

    def open(self, path: str, flags: int) -> int:
        self._node(path)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseOSError(errno.EROFS)
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        n = self._node(path)
        if not stat.S_ISREG(n.mode):
            raise FuseOSError(errno.EISDIR if n.children is not None else errno.EINVAL)
        try:
            if n.packed is not None:
                pack, slot, digest = n.packed
                data = cosmic.read_slot(self.chunk(pack), slot, self.hasher, expect=digest)
                return data[offset:offset + size]
            return read_range(n, offset, size, self.chunk)
        except Exception:  # a missing or corrupt chunk must reach the reader as EIO
            raise FuseOSError(errno.EIO) from None

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        n = self._node(path)
        if name not in n.xattrs:
            raise FuseOSError(errno.ENODATA)
        return n.xattrs[name]

    def listxattr(self, path: str) -> list[str]:
        return list(self._node(path).xattrs)

    def statfs(self, path: str) -> dict[str, int]:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def access(self, path: str, amode: int) -> int:
        self._node(path)
        return 0


def serve(tree: Tree, chunk: Reader, hasher: Hasher, mountpoint: str) -> None:
    """Mount the view at ``mountpoint`` and serve until unmounted or signalled.

    The content never changes under a digest, so the kernel may keep file pages,
    attributes and lookups cached across opens (kernel_cache, long timeouts):
    measured on the Debian rootfs, a second full read takes 1.1 s instead of 2.7 s.
    """
    tree.finish()
    FUSE(TreeFS(tree, chunk, hasher), mountpoint, foreground=True, ro=True,
         allow_other=True, default_permissions=True, use_ino=True, kernel_cache=True,
         fsname="stellarium", subtype="voltainer", attr_timeout=3600, entry_timeout=3600)
