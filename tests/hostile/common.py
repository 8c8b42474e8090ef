"""What the hostile-input tests share: hypothesis settings, a watched "host" tree
outside every root, tar building, and stores opened in-process (fast enough to
run a store per generated example)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import tarfile
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

from stellarium_core.distribution import ImageStore, Importer
from stellarium_core.hashing import Blake3Hasher
from stellarium_core.host import Host, init_store
from stellarium_core.nebula import ChunkStore
from stellarium_core.plugins import Registry

#: Generated cases per test: enough to hit every planted-link shape many times,
#: few enough that all of tests/hostile stays within a few minutes on 2 cores.
#: No deadline: the machine is shared, and a slow example is not a wrong one.
HOSTILE = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow, HealthCheck.data_too_large])
HASHER = Blake3Hasher({})
OUT = "@OUT@"  # stands for the watched outside directory in generated link targets


def chunker():
    return Registry().create("chunker", "fastcdc", {})


@contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh directory six levels below a temporary root.

    Generated link targets climb at most five levels, so even against a broken
    build (where a hostile input does escape) nothing lands outside the
    temporary root: a failing test must not damage the machine it runs on.
    """
    with tempfile.TemporaryDirectory() as tmp:
        deep = Path(tmp, "1", "2", "3", "4", "5", "6")
        deep.mkdir(parents=True)
        yield deep


def make_outside(root: Path) -> Path:
    """The "host" a hostile input tries to reach: a file, a dir, a setuid-free tree."""
    out = root / "outside"
    (out / "dir").mkdir(parents=True)
    (out / "victim").write_bytes(b"host file, must not change\n")
    (out / "dir" / "secret").write_bytes(b"host secret\n")
    os.chmod(out / "dir", 0o750)
    return out


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything about a tree a write could change: type, mode, owner, times, bytes."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            body = (hashlib.sha256(Path(p).read_bytes()).hexdigest()
                    if stat.S_ISREG(st.st_mode) else
                    os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink,
                                             st.st_mtime_ns, body)
    return out


@contextmanager
def image_store(root: Path) -> Iterator[ImageStore]:
    store = ChunkStore.open(root / "nebula", HASHER, create=True)
    try:
        yield ImageStore(root / "images", store, HASHER)
    finally:
        store.close()


def importer(images: ImageStore) -> Importer:
    return Importer(images, chunker(), HASHER)


def tar_of(members: list[tuple[str, str, object, int]], outside: Path) -> bytes:
    """A tar of (name, kind, payload, mode): kind file (payload bytes), dir, symlink
    or hardlink (payload = link name, ``@OUT@`` replaced by ``outside``), fifo, char."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in members:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode, ti.uid, ti.gid = 1_700_000_000, mode, 0, 0
            data = None
            if kind == "file":
                data = bytes(payload)  # type: ignore[arg-type]
                ti.size = len(data)
            elif kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif kind in ("symlink", "hardlink"):
                ti.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                ti.linkname = str(payload).replace(OUT, str(outside))
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            else:
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def leftovers(root: Path) -> list[str]:
    """Scratch or temporary names an operation left in ``root`` (recursively)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".import-") or p.name.endswith(".tmp"))


def new_host(cfg: Path) -> None:
    """A host config at ``cfg`` with its store beside it, initialised in-process."""
    cfg.write_text('[store]\npath = "store"\n')
    init_store(Host.from_config(cfg))


@contextmanager
def open_host(cfg: Path) -> Iterator[Host]:
    """A Host for ``cfg``; its store (if opened) is closed afterwards, so the next
    phase of a test (or ``fsck --repair``) finds the store to itself."""
    host = Host.from_config(cfg)
    try:
        yield host
    finally:
        if "store" in host.__dict__:
            host.store.close()


TRACEBACK = 99  # the exit code :func:`stellar` reports when an exception escaped the CLI


def stellar(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the ``stellar`` CLI run in a forked child.

    Isolated like a subprocess (the child's open store dies with it) and fast
    like a call, so generated tests can run many commands. An exception that
    escapes the CLI, which a user would see as a traceback, exits TRACEBACK.
    """
    from stellarium_core.cli import main

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = TRACEBACK
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
            sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
            code = main([str(a) for a in args])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r, "rb") as o, os.fdopen(err_r, "rb") as e:
        out, err = o.read(), e.read()  # small outputs: no pipe fills up before exit
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(), err.decode()
