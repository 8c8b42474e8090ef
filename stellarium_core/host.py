"""One host: its config, its plugin registry, and the plugins the config selects.

CLIs and runtimes go through a :class:`Host` rather than wiring plugins by hand,
so "which hasher, which chunker, which tiers" is decided in one place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stellarium_core import config as config_mod
from stellarium_core.compression import NONE, Compressors
from stellarium_core.errors import ConfigError, PluginError, StellarError
from stellarium_core.fsutil import write_atomic
from stellarium_core.hookspecs import Chunker, Compressor, Hasher, TierBackend, TierContext
from stellarium_core.nebula.format import CODEC_BYTES, codec_field
from stellarium_core.nebula.table import MAX_LEN
from stellarium_core.plugins import Registry

if TYPE_CHECKING:
    from stellarium_core.nebula import ChunkStore
    from stellarium_core.photon import PhotonRouter


class Host:
    """Lazily builds what a command needs from the host config."""

    def __init__(self, cfg: config_mod.HostConfig, registry: Registry | None = None) -> None:
        self.config = cfg
        self.registry = registry or Registry()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> Host:
        """Load the host config (``--config``, ``$STELLAR_CONFIG`` or default)."""
        return cls(config_mod.load(path))

    def _placed(self, section: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run a plugin factory, placing its ConfigErrors at ``section`` in our file."""
        src = str(self.config.source) if self.config.source else None
        try:
            return fn(*args, **kw)
        except ConfigError as exc:
            key = f"{section}.{exc.key}" if exc.key else section
            raise ConfigError(exc.reason, file=src, key=key) from None
        except PluginError as exc:
            where = ": ".join(p for p in (src, section) if p)
            raise PluginError(f"{where}: {exc}") from None

    @cached_property
    def hasher(self) -> Hasher:
        c = self.config.hasher
        return self._placed("hasher", self.registry.create, "hasher", c.name, c.params)

    @cached_property
    def chunker(self) -> Chunker:
        c = self.config.chunker
        chunker = self._placed("chunker", self.registry.create, "chunker", c.name, c.params)
        if not 0 < chunker.max_size <= MAX_LEN:  # whatever the plugin allows
            raise ConfigError(f"chunker {c.name!r} cuts chunks of up to {chunker.max_size} "
                              f"bytes; NEBULA stores chunks of at most {MAX_LEN}",
                              file=str(self.config.source) if self.config.source else None,
                              key="chunker")
        return chunker

    @cached_property
    def compressor(self) -> Compressor | None:
        """What new chunks are compressed with; None for ``name = "none"``."""
        c = self.config.compressor
        if c.name == NONE:
            return None
        product = self._placed("compressor", self.registry.create, "compressor", c.name,
                               c.params)
        try:
            codec_field(product.name)
        except ValueError:
            raise ConfigError(f"compressor {c.name!r} calls itself {product.name!r}; every "
                              f"chunk record names its compressor in at most {CODEC_BYTES} "
                              "ASCII bytes", file=str(self.config.source) if self.config.source
                              else None, key="compressor.name") from None
        return product

    def store_options(self) -> dict[str, Any]:
        """How this host's NEBULA compresses and decompresses (``ChunkStore.open`` keywords)."""
        c = self.compressor
        return {"compression": NONE if c is None else c,
                "compressors": Compressors(c, self.registry)}

    @cached_property
    def tiers(self) -> dict[str, TierBackend]:
        """Configured tier backends by level (hot, warm, cold)."""
        ctx = TierContext(self.config.store_path)
        return {
            level: self._placed(f"tiers.{level}", self.registry.create, "tier",
                                t.plugin, t.params, context=ctx)
            for level, t in self.config.tiers.items()
        }

    def shm_tier(self) -> TierBackend:
        """The host-wide shared-memory tier with its defaults: the hot level when
        ``[tiers.hot]`` names no other."""
        return self._placed("tiers.hot", self.registry.create, "tier", "shm", {},
                            context=TierContext(self.config.store_path))

    @cached_property
    def photon(self) -> PhotonRouter:
        """This process's PHOTON router: what volumes, image disks, the FUSE view and
        pulls read chunks through. Its counters are saved at exit (best effort)."""
        import atexit

        from stellarium_core.photon import from_host

        router = from_host(self, writeback=False)

        def save_counters() -> None:
            if self.store_path.is_dir():  # not into a store removed meanwhile (tests)
                router.stats.save()

        atexit.register(save_counters)
        return router

    @cached_property
    def store(self) -> ChunkStore:
        """The NEBULA chunk store under ``<store_path>/nebula`` (made by ``init_store``)."""
        from stellarium_core.nebula import ChunkStore

        hook = self.registry.hook.stellarium_chunk_stored
        listeners: list[Callable[[bytes, int, bool], None]] = []
        if self.config.durability == "remote":  # acknowledged only once S3 holds it
            listeners.append(lambda digest, size, new: self.photon.persist(digest, new=new))
        if hook.get_hookimpls():
            listeners.append(lambda digest, size, new: hook(digest=digest, size=size, new=new))
        on_stored = None
        if listeners:
            def on_stored(digest: bytes, size: int, new: bool) -> None:
                for listener in listeners:
                    listener(digest, size, new)
        if not (self.store_path / "nebula").exists():
            check_store_fs(self.config)  # a store under /proc: bad config, not a missing store
        return ChunkStore.open(self.store_path / "nebula", self.hasher, **self.store_options(),
                               verify_reads=self.config.verify_reads, on_stored=on_stored)

    @property
    def store_path(self) -> Path:
        return self.config.store_path

    def vm_defaults(self) -> dict[str, Any]:
        """The [vm] table checked and filled in by the VM runtime plugin; as written when
        that plugin is not installed (nothing here could run a VM then)."""
        from stellarium_core.plugins import installed

        table = self.config.vm
        if not any(p.name == config_mod.VM_RUNTIME for p in installed("runtime")):
            return dict(table)
        try:
            runtime = self.registry.create("runtime", config_mod.VM_RUNTIME, table)
        except ConfigError as exc:
            key = (exc.key or "").removeprefix("params").lstrip(".")
            src = str(self.config.source) if self.config.source else None
            raise ConfigError(exc.reason, file=src, key=f"vm.{key}" if key else "vm") from None
        return runtime.params

    def effective(self) -> dict[str, Any]:
        """The config with plugin parameter defaults filled in by the plugins."""
        out = self.config.to_dict()
        out["hasher"]["params"] = self.hasher.params
        out["chunker"]["params"] = self.chunker.params
        if self.compressor is not None:
            out["compressor"]["params"] = self.compressor.params
        out["vm"] = self.vm_defaults()
        return out


#: Top-level directories of a store; each subsystem owns one.
STORE_DIRS = ("nebula", "volumes", "images", "records", "tiers")
STORE_META = "stellarium.json"


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


#: Kernel filesystems that present kernel state, not storage: a store there is a mistake.
PSEUDO_FS = frozenset({"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs",
                       "securityfs", "pstore", "bpf", "configfs", "fusectl", "mqueue",
                       "binfmt_misc", "efivarfs", "nsfs", "autofs"})


def _fs_type(path: Path) -> str | None:
    """Type of the filesystem ``path`` (absolute, resolved) is on, from mountinfo."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
        inside = str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, right.split()[0]
    return kind


def check_store_fs(cfg: config_mod.HostConfig) -> None:
    """Fail with a ConfigError if the store path lies on a kernel pseudo filesystem."""
    anchor = _nearest_existing(cfg.store_path)
    kind = _fs_type(anchor)
    if kind in PSEUDO_FS:
        raise ConfigError(f"{cfg.store_path} is on the kernel's {kind} filesystem, which "
                          "cannot hold a store", file=str(cfg.source) if cfg.source else None,
                          key="store.path")


def check_store_path(cfg: config_mod.HostConfig) -> None:
    """Fail with a ConfigError if the store path cannot be created or written."""
    path, src = cfg.store_path, str(cfg.source) if cfg.source else None
    check_store_fs(cfg)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory", file=src, key="store.path")
    anchor = _nearest_existing(path)
    if not anchor.is_dir():
        raise ConfigError(f"{anchor} is not a directory, so {path} cannot be created",
                          file=src, key="store.path")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"{anchor} is not writable, so {path} cannot be created",
                          file=src, key="store.path")
    try:
        # os.access ignores read-only mounts for root in some setups; statvfs does not.
        if os.statvfs(anchor).f_flag & os.ST_RDONLY:
            raise ConfigError(f"{anchor} is on a read-only filesystem", file=src,
                              key="store.path")
    except OSError as exc:
        raise ConfigError(f"cannot inspect {anchor}: {exc}", file=src, key="store.path") from None


def init_store(host: Host) -> Path:
    """Validate everything, then create the store layout; idempotent."""
    import json

    host.effective()  # loads the selected plugins and validates their params
    check_store_path(host.config)
    root = host.store_path
    meta_path = root / STORE_META
    meta = {"format": 1, "hasher": host.config.hasher.name}
    if meta_path.exists():
        try:
            have = json.loads(meta_path.read_text())
            if not isinstance(have, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as exc:
            raise StellarError(f"{meta_path}: unreadable store metadata: {exc}") from None
        if have.get("hasher") != meta["hasher"]:
            src = str(host.config.source) if host.config.source else None
            raise ConfigError(
                f"store {root} was created with hasher {have.get('hasher')!r}; "
                f"chunk identities cannot change", file=src, key="hasher.name")
    for d in STORE_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    if not meta_path.exists():
        write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    from stellarium_core.nebula import ChunkStore

    ChunkStore.open(root / "nebula", host.hasher, **host.store_options(), create=True).close()
    return root
