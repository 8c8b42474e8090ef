"""Crash-safe small-file writes, shared by every part of the store.

Manifests, indexes, state files and published blobs are all replaced the same
way: write a temporary sibling, optionally fsync it, rename it over the target,
optionally fsync the directory. Readers then see the old or the new file, never
a mix, and with ``durable`` the change also survives a power cut.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def abandoned_tmp(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a temporary file no live writer will rename any more.

    It must end in ``.tmp``; one named by :func:`write_atomic` carries its
    writer's pid, and counts as abandoned only once that process is gone, so a
    sweep in one process never pulls the file from under a write in another.
    """
    name = os.path.basename(path)
    if not name.endswith(".tmp"):
        return False
    parts = name.split(".")
    if not (name.startswith(".") and len(parts) >= 5 and parts[-3].isdigit()):
        return True  # not ours: nobody owns it any more
    try:
        os.kill(int(parts[-3]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, under another user
    return False


def write_atomic(path: str | os.PathLike[str], data: bytes | memoryview, *,
                 exclusive: bool = False, durable: bool = True,
                 mode: int | None = None) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and a rename.

    ``exclusive`` links instead of renaming, so an existing ``path`` raises
    FileExistsError rather than being overwritten. ``durable`` fsyncs the file
    and its directory. ``mode`` sets the permissions regardless of the umask
    (e.g. files a web server must read). The temporary name carries the pid
    and thread id, so concurrent writers of one path never share it, and ends
    in ``.tmp`` so a sweep can recognise what a crash left.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view):]
            if mode is not None:
                os.fchmod(fd, mode)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a directory tree without recursion and without following symlinks.

    shutil.rmtree recurses once per level (a crafted tar of a few thousand nested
    directories makes it fail with RecursionError) and holds a descriptor per
    level. This holds one: it descends into the first subdirectory left, and
    climbs back through ``..`` once a directory is empty. A missing ``path`` is fine.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    names: list[str] = []          # the path from ``path`` down to where fd is
    try:
        while True:
            sub = None
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        sub = sub or e.name
                    else:
                        os.unlink(e.name, dir_fd=fd)
            if sub is not None:
                child = os.open(sub, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(sub)
                continue
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def claim(parent: str | os.PathLike[str], prefix: str, *,
          directory: bool) -> tuple[Path, int]:
    """A new file or directory ``<parent>/<prefix><random>`` for work in progress.

    The returned descriptor (the caller closes it when done) holds an exclusive
    ``flock`` on it, so :func:`sweep_unclaimed` removes it only once its owner is
    gone, even after a ``kill -9``. It is locked before it gets its name.
    """
    import tempfile  # here, not at import: a VMM's start-up never claims a file
    import uuid

    if directory:
        tmp = tempfile.mkdtemp(prefix=".claim-", dir=parent)
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd, tmp = tempfile.mkstemp(prefix=".claim-", dir=parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = Path(parent) / f"{prefix}{uuid.uuid4().hex}"
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        (remove_tree if directory else os.unlink)(tmp)
        raise
    return path, fd


def sweep_unclaimed(parent: str | os.PathLike[str], prefix: str) -> int:
    """Remove what :func:`claim` made under ``parent`` whose owner is gone; how many."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                remove_tree(path)
            else:
                os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed
