"""The memory tier through the plugin registry, as the host loads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from stellarium_core.errors import ConfigError
from stellarium_core.hookspecs import TierBackend, TierContext, TierFull
from stellarium_core.plugins import Registry


def make(tmp_path: Path, **params: object):
    return Registry().create("tier", "memory", dict(params), context=TierContext(tmp_path))


def test_contract_roundtrip_and_usage(tmp_path: Path) -> None:
    t = make(tmp_path, capacity="64KiB")
    assert isinstance(t, TierBackend)
    t.put(b"k" * 32, b"hello")
    t.put(b"e" * 32, b"")  # an empty chunk is legal
    t.put(b"k" * 32, b"hello")  # idempotent
    assert t.get(b"k" * 32) == b"hello" and t.get(b"e" * 32) == b""
    assert t.get(b"x" * 32) is None and not t.contains(b"x" * 32)
    assert sorted(t.keys()) == [b"e" * 32, b"k" * 32]
    u = t.usage()
    assert (u.objects, u.used_bytes, u.capacity_bytes) == (2, 5, 64 * 1024)
    t.delete(b"k" * 32)
    t.delete(b"k" * 32)  # absent: no error
    assert t.usage().used_bytes == 0 and not t.contains(b"k" * 32)
    t.close()
    assert t.usage().objects == 0


def test_capacity_is_a_hard_cap(tmp_path: Path) -> None:
    t = make(tmp_path, capacity=10)
    t.put(b"a" * 32, b"123456")
    with pytest.raises(TierFull, match="exceed its capacity of 10"):
        t.put(b"b" * 32, b"123456")
    assert not t.contains(b"b" * 32) and t.usage().used_bytes == 6


@pytest.mark.parametrize("params,key", [
    ({"capacity": "lots"}, "params.capacity"),
    ({"capacity": 0}, "params.capacity"),
    ({"size": 1}, "params.size"),
])
def test_bad_params_name_the_key(tmp_path: Path, params: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, **params)
    assert exc.value.key == key
