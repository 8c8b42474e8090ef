"""Paths an image, a tar or a manifest names, resolved only beneath their root.

Every writer that turns untrusted names into files (tar import, docker-save and
OCI layouts, tree restore, pulled layers) goes through :class:`ConfinedDir`. It
holds a descriptor of the root and walks each path one component at a time
with ``openat(O_NOFOLLOW | O_DIRECTORY)``, then acts on the last component with
the ``*at`` calls and no-follow flags. So a symlink planted by an earlier tar
member or manifest entry is never written through, a ``..`` never climbs out,
and a hardlink target must name a file inside the root. This is the semantics
of ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)``, done with plain
descriptors so it works on every kernel, needs no ctypes, and also serves the
one case that must follow links: reading a file an archive names through a
relative symlink of its own (old docker-save archives link repeated layers),
which :meth:`ConfinedDir.open_read` resolves strictly inside the root.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from stellarium_core.errors import StellarError

#: Symlinks followed while resolving one path for reading (the kernel's own limit).
MAX_LINKS = 40
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePathError(StellarError):
    """A path would leave its root or pass through a symlink; nothing was written."""


def split(rel: str) -> list[str]:
    """The components of a relative path; ``.`` (the root itself) gives [].

    Absolute paths, ``..``, empty or ``.`` components and NUL bytes are refused:
    callers normalise what their format allows (tar strips a leading ``/``)
    before they get here.
    """
    if rel == ".":
        return []
    parts = rel.split("/")
    if not rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"unsafe path {rel!r}: it must be relative, without '..' "
                              "or empty parts")
    return parts


class ConfinedDir:
    """A directory that paths are resolved beneath, never through a symlink.

    Methods take '/'-separated relative paths (see :func:`split`). Entries are
    created exclusively; with ``replace=True`` an existing non-directory of the
    same name is unlinked first (tar semantics: a later member wins), which
    removes a planted symlink rather than writing through it.
    """

    def __init__(self, path: str | os.PathLike[str], *, make_parents: bool = False) -> None:
        """``make_parents``: create missing parent directories (mode 0755), as tar
        extraction does for archives that do not list every directory."""
        self.path = os.fspath(path)
        self.make_parents = make_parents
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The directory most recently resolved: manifests and tars list parents
        # first, so the next path usually continues from here (deep trees stay linear).
        self._last: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ConfinedDir:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- resolution ------------------------------------------------------------------

    def _unsafe(self, rel: str, exc: OSError) -> Exception:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return UnsafePathError(f"{rel!r} would be written through a symlink or a "
                                   f"non-directory inside {self.path}; refused")
        exc.filename = os.path.join(self.path, rel)
        return exc

    def _dir(self, parts: tuple[str, ...], rel: str) -> int:
        """A new descriptor of the directory ``parts`` (no symlink on the way)."""
        start, fd = 0, self.fd
        last = self._last
        if last is not None and parts[:len(last[0])] == last[0]:
            start, fd = len(last[0]), last[1]
        fd = os.dup(fd)
        try:
            for name in parts[start:]:
                try:
                    nxt = os.open(name, _DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not self.make_parents:
                        raise
                    os.mkdir(name, 0o755, dir_fd=fd)
                    nxt = os.open(name, _DIR, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError as exc:
            os.close(fd)
            raise self._unsafe(rel, exc) from None
        if self._last is not None:
            os.close(self._last[1])
        self._last = (parts, os.dup(fd))
        return fd

    @contextmanager
    def parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(descriptor of the directory holding ``rel``, its last component)."""
        parts = split(rel)
        if not parts:
            raise UnsafePathError("the root itself cannot be replaced")
        fd = self._dir(tuple(parts[:-1]), rel)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    # -- creating entries ------------------------------------------------------------

    @staticmethod
    def _clear(fd: int, name: str, replace: bool, rel: str) -> None:
        """Make room for a new non-directory ``name``: unlink what is there if allowed."""
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not replace:
            raise UnsafePathError(f"{rel!r} is listed twice; refused")
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{rel!r} would replace a directory; refused")
        os.unlink(name, dir_fd=fd)

    def mkdir(self, rel: str, mode: int = 0o700, *, replace: bool = False) -> None:
        """Create directory ``rel``; with ``replace`` an existing directory is kept
        and an existing non-directory is replaced."""
        with self.parent(rel) as (fd, name):
            try:
                os.mkdir(name, mode, dir_fd=fd)
                return
            except FileExistsError:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and replace:
                    return
                self._clear(fd, name, replace, rel)
            os.mkdir(name, mode, dir_fd=fd)

    def create(self, rel: str, mode: int = 0o600, *, replace: bool = False) -> int:
        """A new regular file ``rel``, open for writing (the caller closes it)."""
        with self.parent(rel) as (fd, name):
            self._clear(fd, name, replace, rel)
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                           | os.O_CLOEXEC, mode, dir_fd=fd)

    def symlink(self, target: str, rel: str, *, replace: bool = False) -> None:
        """A symlink ``rel`` -> ``target``; the target is data and is never followed here."""
        with self.parent(rel) as (fd, name):
            self._clear(fd, name, replace, rel)
            os.symlink(target, name, dir_fd=fd)

    def mknod(self, rel: str, mode: int, rdev: int = 0, *, replace: bool = False) -> None:
        with self.parent(rel) as (fd, name):
            self._clear(fd, name, replace, rel)
            os.mknod(name, mode, rdev, dir_fd=fd)

    def link(self, target: str, rel: str, *, replace: bool = False) -> None:
        """A hardlink ``rel`` to the existing non-directory ``target``, both inside.

        A symlink target is linked as the symlink itself (``linkat`` without
        AT_SYMLINK_FOLLOW), so a link can never reach a file outside the root.
        """
        with self.parent(target) as (tfd, tname):
            try:
                st = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafePathError(f"hardlink {rel!r} -> {target!r}: the target is not "
                                      f"in {self.path}") from None
            if stat.S_ISDIR(st.st_mode):
                raise UnsafePathError(f"hardlink {rel!r} -> {target!r} names a directory")
            with self.parent(rel) as (fd, name):
                self._clear(fd, name, replace, rel)
                os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)

    def set_attrs(self, rel: str, *, uid: int, gid: int, mode: int | None, mtime_ns: int,
                  xattrs: dict[str, bytes] | None = None) -> None:
        """Owner, then mode (chown clears set-id bits), xattrs, times; never through a
        symlink (``mode`` is None for symlinks, which have none)."""
        parts = split(rel)
        if parts:
            ctx = self.parent(rel)
        else:
            ctx = _root_ctx(self.fd)
        with ctx as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            if mode is not None:
                os.chmod(name, mode, dir_fd=fd, follow_symlinks=False)
            for k, v in (xattrs or {}).items():
                # setxattr has no *at form: name the entry through the parent's descriptor.
                os.setxattr(f"/proc/self/fd/{fd}/{name}", k, v, follow_symlinks=False)
            os.utime(name, ns=(mtime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)

    # -- reading ---------------------------------------------------------------------

    def open_read(self, rel: str) -> int:
        """A descriptor of the regular file ``rel``, for reading.

        Symlinks on the way are followed only while they stay inside the root:
        relative targets that climb above it and absolute targets are refused.
        """
        todo = split(rel)
        for _ in range(MAX_LINKS + 1):
            fd = os.dup(self.fd)
            try:
                for i, name in enumerate(todo):
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode):
                        target = os.readlink(name, dir_fd=fd)
                        todo = self._splice(todo[:i], target, rel) + todo[i + 1:]
                        break
                    if i == len(todo) - 1:
                        if not stat.S_ISREG(st.st_mode):
                            raise UnsafePathError(f"{rel!r} in {self.path} is not a regular file")
                        return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                       | os.O_CLOEXEC, dir_fd=fd)
                    nxt = os.open(name, _DIR, dir_fd=fd)
                    os.close(fd)
                    fd = nxt
                else:
                    raise UnsafePathError(f"{rel!r} names the root of {self.path}, not a file")
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no such file",
                                        os.path.join(self.path, rel)) from None
            except OSError as exc:
                raise self._unsafe(rel, exc) from None
            finally:
                os.close(fd)
        raise UnsafePathError(f"{rel!r} in {self.path}: more than {MAX_LINKS} symlinks")

    def _splice(self, base: list[str], target: str, rel: str) -> list[str]:
        if target.startswith("/"):
            raise UnsafePathError(f"{rel!r} leads through an absolute symlink ({target!r}) "
                                  f"inside {self.path}; refused")
        out = list(base)
        for p in target.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not out:
                    raise UnsafePathError(f"{rel!r} leads through a symlink ({target!r}) "
                                          f"that climbs out of {self.path}; refused")
                out.pop()
            else:
                out.append(p)
        return out


@contextmanager
def _root_ctx(fd: int) -> Iterator[tuple[int, str]]:
    """The root itself as (descriptor, name) for the ``*at`` calls: ``.`` in itself."""
    yield fd, "."
