"""virtio-rng driven as a guest driver would: entropy arrives, the rate limit holds the
guest to its budget with a real timerfd, hostile rings stop the device (fuzzed)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from stellarium_virtio_rng.device import VirtioRng

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile
from stellarium_core.errors import ConfigError
from stellarium_core.plugins import Registry


def test_each_buffer_gets_fresh_entropy():
    rig = Rig(VirtioRng())
    ring = rig.rings[0]
    heads = [ring.add([(64, True)]) for _ in range(3)]
    rig.kick(0)
    used = ring.used()
    assert [h for h, _ in used] == [h for h, _ in heads] and all(n == 64 for _, n in used)
    chunks = [ring.read(addrs[0], 64) for _, addrs in heads]
    assert len(set(chunks)) == 3 and all(c != bytes(64) for c in chunks)
    assert rig.interrupts == 1
    assert rig.dev.metrics()["bytes"] == 192
    rig.close()


def test_a_buffer_with_nowhere_to_write_comes_back_empty():
    rig = Rig(VirtioRng())
    ring = rig.rings[0]
    head, _ = ring.add([(b"readable", False)])
    rig.kick(0)
    assert ring.used() == [(head, 0)]
    rig.close()


def test_rate_limit_makes_the_guest_wait_for_the_timer():
    rig = Rig(VirtioRng(bytes_per_sec=8192))
    ring = rig.rings[0]
    for _ in range(4):
        ring.add([(4096, True)])
    start = time.monotonic()
    rig.kick(0)
    first = ring.used()
    assert sum(n for _, n in first) == 8192           # the bucket's one second of burst
    assert rig.dev.metrics()["throttled"] == 1
    got = list(first)
    rig.settle(lambda: (got.extend(ring.used()) or len(got) == 4))
    elapsed = time.monotonic() - start
    total = sum(n for _, n in got)
    assert total <= 8192 + elapsed * 8192 + 64, (total, elapsed)
    assert total > 8192 and elapsed >= 0.45, (total, elapsed)
    rig.close()


def test_hostile_chain_asks_for_a_reset():
    rig = Rig(VirtioRng())
    ring = rig.rings[0]
    write_hostile(ring, ([(("abs", 1 << 40), 64, 2, 0)], [0], 1, [b""]))
    rig.kick(0)
    assert rig.link.resets and "outside guest memory" in rig.link.resets[0]
    ring.add([(16, True)])
    rig.kick(0)                                    # ignored until the driver resets
    assert ring.used() == []
    rig.dev.reset()
    rig.activate()
    rig.close()


def test_plugin_takes_strings_and_numbers():
    reg = Registry()
    dev = reg.create("device", "virtio-rng", {"bytes_per_sec": "4096"}, context=None)
    assert dev.rate == 4096
    dev.close()
    assert reg.create("device", "virtio-rng", {}, context=None).rate == 0
    with pytest.raises(ConfigError, match="bytes_per_sec"):
        reg.create("device", "virtio-rng", {"bytes_per_sec": "-5"}, context=None)
    with pytest.raises(ConfigError, match="known keys: bytes_per_sec"):
        reg.create("device", "virtio-rng", {"rate": 5}, context=None)


@pytest.fixture(scope="module")
def fuzz_rig():
    rig = Rig(VirtioRng(bytes_per_sec=1 << 20), ram_size=4 << 20)
    yield rig
    rig.close()


@fuzz_settings()
@given(program=fuzz_strategy())
def test_fuzz_random_rings(fuzz_rig, program):
    fuzz_rig.restart()
    write_hostile(fuzz_rig.rings[0], program)
    with time_limit(2.0):
        fuzz_rig.kick(0)
        fuzz_rig.turn()
        fuzz_rig.kick(0)
    fuzz_rig.ram.check_guards()
