"""Build Volt's minimal microVM guest kernel from Debian's linux-source package.

The kernel is ``make allnoconfig`` plus the repo's config fragment
(``microvm.config``), built out of tree so one extracted source serves every
fragment. Results are cached by (source package version, fragment hash); a lock
per key lets parallel callers wait for one build instead of racing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from stellarium_core.errors import StellarError
from volt import cache

FRAGMENT = Path(__file__).with_name("microvm.config")
SOURCE_PACKAGE = "linux-source-6.1"
#: Bump when the build procedure changes in a way that changes its output.
RECIPE = 1


@dataclass(frozen=True)
class KernelBuild:
    """A built guest kernel: both boot formats plus the exact .config used."""

    vmlinux: Path
    bzimage: Path
    config: Path
    source_version: str
    fragment_hash: str
    kernel_release: str
    build_seconds: float

    def to_dict(self) -> dict[str, object]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def fragment_hash(fragment: Path = FRAGMENT) -> str:
    """Digest of the fragment text and the recipe version (the build's config input)."""
    h = hashlib.sha256(f"recipe={RECIPE}\n".encode())
    h.update(fragment.read_bytes())
    return h.hexdigest()[:16]


def _dpkg_version(package: str) -> str | None:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Version}", package],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    status, _, version = out.stdout.partition(" ")
    return version.strip() if status == "installed" else None


def _apt_install(*packages: str) -> None:
    print(f"volt: installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise StellarError(f"apt-get install {' '.join(packages)} failed:\n{tail}")


def source_tarball() -> tuple[Path, str]:
    """The linux-source tarball and its package version, installing it when missing."""
    version = _dpkg_version(SOURCE_PACKAGE)
    if version is None:
        _apt_install(SOURCE_PACKAGE)
        version = _dpkg_version(SOURCE_PACKAGE)
    tarballs = sorted(Path("/usr/src").glob("linux-source-6.1.tar.*"))
    if version is None or not tarballs:
        raise StellarError(f"{SOURCE_PACKAGE} is not installed and could not be installed")
    return tarballs[0], version


def source_tree(tarball: Path, version: str) -> Path:
    """The extracted source tree for ``version`` (extracted once, then shared read-only)."""
    base = cache.root() / "src" / f"linux-source-{version}"
    with cache.locked(base):
        if not base.is_dir():
            partial = base.with_name(base.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            print(f"volt: extracting {tarball}", file=sys.stderr)
            subprocess.run(["tar", "-xf", str(tarball), "-C", str(partial)], check=True)
            os.replace(partial, base)
    trees = [p for p in base.iterdir() if (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise StellarError(f"{base}: expected one kernel source tree, found {len(trees)}")
    return trees[0]


def fragment_options(fragment: Path = FRAGMENT) -> dict[str, str]:
    """The options a fragment sets: name -> value ("n" for ``# CONFIG_X is not set``)."""
    opts: dict[str, str] = {}
    for line in fragment.read_text().splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            opts[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            opts[m[1]] = "n"
    return opts


def read_config(path: Path) -> dict[str, str]:
    """A kernel .config as name -> value, unset options as "n"."""
    return fragment_options(path)


def check_config(config: Path, fragment: Path = FRAGMENT) -> None:
    """Fail loudly, naming every fragment option the resulting .config does not honour."""
    want, have = fragment_options(fragment), read_config(config)
    bad = [f"{k}={v} (got {have.get(k, 'n')})" for k, v in want.items()
           if have.get(k, "n") != v]
    if bad:
        raise StellarError("kernel config does not honour the fragment; missing or changed "
                           "(check their dependencies): " + ", ".join(bad))


def cached(fragment: Path = FRAGMENT) -> KernelBuild | None:
    """The cached build for the installed source and this fragment, if there is one."""
    version = _dpkg_version(SOURCE_PACKAGE)
    if version is None:
        return None
    return _load(cache.root() / "kernels" / f"{version}-{fragment_hash(fragment)}")


def _load(out: Path) -> KernelBuild | None:
    meta = out / "build.json"
    if not meta.is_file():
        return None
    d = json.loads(meta.read_text())
    return KernelBuild(vmlinux=out / "vmlinux", bzimage=out / "bzImage", config=out / "config",
                       source_version=d["source_version"], fragment_hash=d["fragment_hash"],
                       kernel_release=d["kernel_release"], build_seconds=d["build_seconds"])


def build(fragment: Path = FRAGMENT, *, jobs: int | None = None, quiet: bool = True,
          log: Path | None = None) -> KernelBuild:
    """Build (or reuse from cache) the guest kernel for ``fragment``."""
    tarball, version = source_tarball()
    fhash = fragment_hash(fragment)
    out = cache.root() / "kernels" / f"{version}-{fhash}"
    with cache.locked(out):
        if (done := _load(out)) is not None:
            return done
        src = source_tree(tarball, version)
        work = out.with_name(out.name + ".build")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log = log or work / "build.log"
        print(f"volt: building the guest kernel from {SOURCE_PACKAGE} {version} (several "
              f"minutes; log: {log})", file=sys.stderr)
        started = time.monotonic()
        make = ["make", "-C", str(src), f"O={work}", "ARCH=x86_64"]
        with open(log, "w") as logfh:
            def step(*targets: str, env: dict[str, str] | None = None) -> None:
                cmd = [*make, *targets]
                proc = subprocess.run(cmd, env=env, stdout=None if not quiet else logfh,
                                      stderr=subprocess.STDOUT if quiet else None)
                if proc.returncode != 0:
                    raise StellarError(f"kernel build step `make {' '.join(targets)}` failed "
                                       f"(exit {proc.returncode}); see {log}")
            step("allnoconfig", env=dict(os.environ, KCONFIG_ALLCONFIG=str(fragment)))
            check_config(work / ".config", fragment)
            step(f"-j{jobs or os.cpu_count() or 2}", "vmlinux", "bzImage")
        release = (work / "include/config/kernel.release").read_text().strip()
        staged = out.with_name(out.name + ".staged")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        shutil.copy2(work / "vmlinux", staged / "vmlinux")
        shutil.copy2(work / "arch/x86/boot/bzImage", staged / "bzImage")
        shutil.copy2(work / ".config", staged / "config")
        meta = {"source_version": version, "fragment_hash": fhash, "kernel_release": release,
                "build_seconds": round(time.monotonic() - started, 1), "recipe": RECIPE}
        (staged / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
        shutil.rmtree(work, ignore_errors=True)
        result = _load(out)
        assert result is not None
        return result
