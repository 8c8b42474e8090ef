"""The nvme tier through the plugin registry: files, durability layout, restarts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import TierBackend, TierContext
from stellarium_core.plugins import Registry

K = bytes(range(32))


def make(store: Path, **params: object):
    return Registry().create("tier", "nvme", dict(params), context=TierContext(store))


def test_chunks_are_sharded_files_under_the_store(tmp_path: Path) -> None:
    t = make(tmp_path)
    assert isinstance(t, TierBackend)
    t.put(K, b"payload")
    f = tmp_path / "tiers" / "nvme" / K.hex()[:2] / K.hex()
    assert f.read_bytes() == b"payload"
    assert not list(f.parent.glob("*.tmp"))
    assert t.get(K) == b"payload" and t.contains(K)
    assert t.usage().objects == 1 and t.usage().used_bytes == 7
    t.delete(K)
    assert not f.exists() and t.get(K) is None and t.usage().used_bytes == 0


def test_a_new_instance_sees_the_chunks_and_sweeps_torn_writes(tmp_path: Path) -> None:
    t = make(tmp_path, path=str(tmp_path / "elsewhere"))
    t.put(K, b"kept")
    t.close()
    torn = tmp_path / "elsewhere" / K.hex()[:2] / f"{'ab' * 32}.123.tmp"
    torn.write_bytes(b"half")
    dead = _exited_pid()
    orphan = torn.with_name(f".{'cd' * 32}.{dead}.1.tmp")         # write_atomic's, writer gone
    in_flight = torn.with_name(f".{'ef' * 32}.{os.getpid()}.1.tmp")  # a live writer's
    orphan.write_bytes(b"half")
    in_flight.write_bytes(b"half")
    t2 = make(tmp_path, path=str(tmp_path / "elsewhere"))
    assert list(t2.keys()) == [K] and t2.get(K) == b"kept"
    assert not torn.exists() and not orphan.exists()
    assert in_flight.exists()  # another process's put must still be able to rename it


def _exited_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_path_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a directory") as exc:
        make(tmp_path, path=str(tmp_path / "f"))
    assert exc.value.key == "params.path"


def test_unknown_param_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key") as exc:
        make(tmp_path, capacity="1GiB")
    assert exc.value.key == "params.capacity"
