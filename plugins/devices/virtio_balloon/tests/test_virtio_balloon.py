"""virtio-balloon driven as Linux's driver does: inflated pages really leave the host
(memfd blocks freed, not just unmapped), target and actual through the config space,
statistics through the held stats buffer, hostile rings fuzzed."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from stellarium_virtio_balloon.device import (
    DEFLATE,
    INFLATE,
    STATS,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VirtioBalloon,
)

from devtools.virtio_rings import Rig, fuzz_settings, fuzz_strategy, time_limit, write_hostile
from stellarium_core.errors import ConfigError
from stellarium_core.plugins import Registry

PAGE = 4096


def pfns(first: int, count: int) -> bytes:
    return struct.pack(f"<{count}I", *range(first, first + count))


def memfd_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_inflating_frees_the_memfd_pages_and_deflating_gives_them_back():
    rig = Rig(VirtioBalloon(amount_mib=2), memfd=True)
    ram = rig.ram.ram
    first = (4 << 20) // PAGE                      # guest pages 4 MiB .. 6 MiB
    ram[4 << 20:6 << 20] = b"\x5a" * (2 << 20)
    ring = rig.rings[INFLATE]
    for i in range(0, 512, 256):                   # two requests of 256 frames, as Linux sends
        ring.add([(pfns(first + i, 256), False)])
    ram[ring.used_addr:ring.used_addr + 4 * PAGE] = bytes(4 * PAGE)   # rings in place first
    before = memfd_bytes(rig.ram.fd)
    rig.kick(INFLATE)
    assert [n for _, n in ring.used()] == [0, 0]
    freed = before - memfd_bytes(rig.ram.fd)
    assert freed == 2 << 20, f"the memfd still holds {(2 << 20) - freed} bytes it should not"
    assert ram[4 << 20:6 << 20] == bytes(2 << 20)    # the guest sees zero pages afterwards
    assert ram[(4 << 20) - 1] == 0 and ram[6 << 20] == 0
    m = rig.dev.metrics()
    assert m["inflated_pages"] == 512 and m["released_bytes"] == 2 << 20
    assert m["release_errors"] == 0
    rig.rings[DEFLATE].add([(pfns(first, 256), False)])
    rig.kick(DEFLATE)
    assert rig.dev.metrics()["deflated_pages"] == 256
    rig.close()


def test_private_memory_is_released_with_dontneed():
    rig = Rig(VirtioBalloon())
    ram = rig.ram.ram
    ram[3 << 20:(3 << 20) + 3 * PAGE] = b"\x77" * (3 * PAGE)
    rig.rings[INFLATE].add([(pfns((3 << 20) // PAGE + 1, 1), False)])
    rig.kick(INFLATE)
    assert ram[3 << 20:(3 << 20) + PAGE] == b"\x77" * PAGE        # its neighbours stay
    assert ram[(3 << 20) + PAGE:(3 << 20) + 2 * PAGE] == bytes(PAGE)
    assert ram[(3 << 20) + 2 * PAGE:(3 << 20) + 3 * PAGE] == b"\x77" * PAGE
    rig.close()


def test_frames_outside_guest_ram_are_counted_not_touched():
    rig = Rig(VirtioBalloon(), ram_size=4 << 20)
    rig.rings[INFLATE].add([(struct.pack("<3I", 0xFFFFFFFF, (4 << 20) // PAGE, 5), False)])
    rig.kick(INFLATE)
    m = rig.dev.metrics()
    assert m["bad_pfns"] == 2 and m["released_bytes"] == PAGE
    rig.ram.check_guards()
    rig.close()


def test_target_actual_and_config_interrupt():
    dev = VirtioBalloon(amount_mib=64, deflate_on_oom=True)
    assert dev.features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    rig = Rig(dev)
    assert struct.unpack("<II", dev.read_config(0, 8)) == (64 * 256, 0)
    dev.write_config(4, struct.pack("<I", 1000))
    dev.set_target_mib(16)
    assert rig.link.config_changes == 1
    assert struct.unpack("<I", dev.read_config(0, 4))[0] == 16 * 256
    s = dev.statistics()
    assert (s["target_pages"], s["actual_pages"], s["target_mib"], s["actual_mib"]) == \
        (4096, 1000, 16, 3)
    with pytest.raises(ValueError):
        dev.set_target_mib(-1)
    rig.close()


def test_statistics_arrive_through_the_held_buffer_every_interval():
    dev = VirtioBalloon(stats_polling_interval_s=1)
    rig = Rig(dev)
    ring = rig.rings[STATS]
    first = struct.pack("<HQHQHQ", 4, 1000 << 12, 5, 2000 << 12, 42, 7)   # 42: unknown tag
    head, _ = ring.add([(first, False)])
    rig.kick(STATS)
    assert ring.used() == []                       # held until the interval asks again
    s = dev.statistics()
    assert s["free_memory"] == 1000 << 12 and s["total_memory"] == 2000 << 12
    assert "swap_in" not in s                      # absent stats are omitted
    dev.set_stats_interval(1)
    rig.settle(lambda: bool(ring.used()), timeout=3.0)
    ring.add([(struct.pack("<HQ", 4, 999), False)])
    rig.kick(STATS)
    assert dev.statistics()["free_memory"] == 999
    dev.set_stats_interval(0)
    rig.close()


def test_hostile_ring_asks_for_reset():
    rig = Rig(VirtioBalloon())
    write_hostile(rig.rings[INFLATE], ([(("heap", 0), 8, 1, 0)], [0], 1, [b""]))  # a loop
    rig.kick(INFLATE)
    assert rig.link.resets and "loops" in rig.link.resets[0]
    rig.close()


def test_plugin_params():
    reg = Registry()
    dev = reg.create("device", "virtio-balloon", {"amount_mib": "64", "deflate_on_oom": "on",
                                                  "stats_polling_interval_s": 5}, context=None)
    assert dev.target_pages == 64 * 256 and dev.stats_interval == 5
    assert dev.features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    dev.close()
    with pytest.raises(ConfigError, match="deflate_on_oom"):
        reg.create("device", "virtio-balloon", {"deflate_on_oom": "maybe"}, context=None)
    with pytest.raises(ConfigError, match="amount_mib"):
        reg.create("device", "virtio-balloon", {"amount_mib": "99999999"}, context=None)


@pytest.fixture(scope="module")
def fuzz_rig():
    rig = Rig(VirtioBalloon(amount_mib=1), ram_size=4 << 20)
    yield rig
    rig.close()


#: Page-frame arrays that mostly land in guest RAM (the heap and rings included).
PFN_PAYLOADS = st.one_of(
    st.lists(st.integers(0, (4 << 20) // PAGE + 8), max_size=32).map(
        lambda xs: struct.pack(f"<{len(xs)}I", *xs)),
    st.binary(max_size=64))


@fuzz_settings()
@given(queue=st.sampled_from([INFLATE, DEFLATE, STATS]),
       program=fuzz_strategy(PFN_PAYLOADS))
def test_fuzz_random_rings(fuzz_rig, queue, program):
    fuzz_rig.restart()
    write_hostile(fuzz_rig.rings[queue], program)
    with time_limit(2.0):
        fuzz_rig.kick(queue)
        fuzz_rig.dev._poll_stats(0)
        fuzz_rig.kick(queue)
    fuzz_rig.ram.check_guards()


def test_snapshot_state_keeps_sizes_interval_and_the_held_stats_buffer():
    from stellarium_virtio_balloon.device import STATS

    from stellarium_core.virtio import StateError

    src = Rig(VirtioBalloon(amount_mib=8, stats_polling_interval_s=0))
    src.dev.write_config(4, struct.pack("<I", 100))
    head, _ = src.rings[STATS].add([(struct.pack("<HQ", 4, 12345), False)])
    src.kick(STATS)
    src.dev.set_target_mib(16)
    saved = src.dev.save_state()
    dst = Rig(VirtioBalloon(amount_mib=8))
    dst.dev.restore_state(saved)
    stats = dst.dev.statistics()
    assert (stats["target_mib"], stats["actual_pages"]) == (16, 100)
    assert dst.dev._stats_head == head
    for bad, message in ((b"not json", "not JSON"),
                         (saved.replace(b'"stats_head": 0', b'"stats_head": 4096'),
                          "not a descriptor"),
                         (b'{"target_pages": 1}', "missing actual_pages")):
        with pytest.raises(StateError, match=message):
            dst.dev.restore_state(bad)
    assert dst.dev.statistics()["target_mib"] == 16
    src.close()
    dst.close()
