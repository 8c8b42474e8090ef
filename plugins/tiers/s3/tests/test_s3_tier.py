"""The s3 tier plugin against a real SeaweedFS on loopback, and its failure modes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.net import free_port
from stellarium_core.errors import ConfigError, StellarError
from stellarium_core.hookspecs import TierBackend, TierContext, TierUnavailable
from stellarium_core.plugins import Registry

K1, K2 = bytes(range(32)), bytes(range(1, 33))


def make(tmp_path: Path, **params: object):
    return Registry().create("tier", "s3", dict(params), context=TierContext(tmp_path))


def test_contract_roundtrip(seaweedfs, tmp_path: Path) -> None:
    params = seaweedfs.tier_params(prefix="pre/fix")
    t = make(tmp_path, **params)
    assert isinstance(t, TierBackend)
    assert t.get(K1) is None and not t.contains(K1)
    t.put(K1, b"one")
    t.put(K2, memoryview(b"two!"))
    assert t.get(K1) == b"one" and t.contains(K2)
    assert sorted(t.keys()) == [K1, K2]
    u = t.usage()
    assert (u.objects, u.used_bytes, u.capacity_bytes) == (2, 7, None)
    obj = seaweedfs.client().get_object(Bucket=params["bucket"],
                                        Key=f"pre/fix/{K1.hex()[:2]}/{K1.hex()}")
    assert obj["Body"].read() == b"one"
    t.delete(K1)
    t.delete(K1)  # absent: no error
    assert t.get(K1) is None and list(t.keys()) == [K2]
    t.close()


def test_making_the_tier_touches_no_network(tmp_path: Path) -> None:
    t = make(tmp_path, bucket="b", endpoint_url=f"http://127.0.0.1:{free_port()}",
             access_key_id="a", secret_access_key="b", connect_timeout=1.0, max_attempts=1)
    assert t._client is None
    start = time.monotonic()
    with pytest.raises(TierUnavailable, match="put_object: EndpointConnectionError"):
        t.put(K1, b"x")
    with pytest.raises(TierUnavailable):
        t.get(K1)
    assert time.monotonic() - start < 30  # a refused connection, not a hang


def test_missing_bucket_is_an_error_not_a_miss(seaweedfs, tmp_path: Path) -> None:
    t = make(tmp_path, **seaweedfs.tier_params(bucket="never-created", create_bucket=False))
    with pytest.raises(StellarError, match="never-created: put_object: [A-Za-z]+") as exc:
        t.put(K1, b"x")
    assert not isinstance(exc.value, TierUnavailable)  # retrying cannot fix this


@pytest.mark.parametrize("params,key", [
    ({}, "params.bucket"),
    ({"bucket": "b", "access_key_id": "only-half"}, "params.secret_access_key"),
    ({"bucket": "b", "prefix": "/abs"}, "params.prefix"),
    ({"bucket": "b", "max_attempts": 0}, "params.max_attempts"),
])
def test_bad_params_name_the_key(tmp_path: Path, params: dict, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        make(tmp_path, **params)
    assert exc.value.key == key
