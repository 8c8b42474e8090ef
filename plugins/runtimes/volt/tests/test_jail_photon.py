"""A confined VMM and PHOTON's host-wide hot tier, under the real kernel's Landlock.

The VMM parses guest bytes, and the hot tier's chunks are trusted by every reader
without re-hashing, so the VMM gets the hot tier read-only: it uses chunks that
trusted processes verified and placed, never places any itself, and still saves
its hit counters (``<store>/tiers`` is granted for writing).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from volt.jail import landlock

PROBE = textwrap.dedent("""
    import json, sys
    from stellarium_core.host import Host
    from stellarium_core.volumes.volume import VolumeStore
    from stellarium_virtio_stellar.plugin import open_device
    from volt.jail.confine import Confinement
    from volt.jail.policy import Policy

    cfg = sys.argv[1]
    host = Host.from_config(cfg)
    vol = VolumeStore.for_host(host).open("v1", readonly=True)  # as the device does
    pol = Policy.for_vm(sys.argv[2], None, [open_device(host, "v1", readonly=True)])
    Confinement("on", "kill").apply_process(pol)  # a VMM main thread's filter too
    hot = bytes.fromhex(sys.argv[3])
    cold = bytes.fromhex(sys.argv[4])
    assert vol.read(0, 5) == b"hot!!"
    assert vol.read(65536, 5) == b"cold!"
    host.photon.stats.save()
    shm = host.photon.tiers["hot"]
    print(json.dumps({"hot_held": shm.contains(hot), "cold_placed": shm.contains(cold),
                      "report": host.photon.report()}))
""")


@pytest.mark.skipif(landlock.abi_version() == 0, reason="this kernel has no Landlock")
def test_a_confined_vmm_reads_the_hot_tier_but_never_places(tmp_path: Path) -> None:
    pytest.importorskip("stellarium_virtio_stellar",
                        reason="the virtio-stellar device plugin is not installed")
    from stellarium_core.host import Host, init_store
    from stellarium_core.volumes.volume import VolumeStore

    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    host = Host.from_config(cfg)
    init_store(host)
    with VolumeStore.for_host(host).create("v1", 1 << 20) as vol:
        vol.write(0, b"hot!!" + bytes(65531))
        vol.write(65536, b"cold!" + bytes(65531))
    hot = vol.manifest.refs[0].digest
    cold = vol.manifest.refs[1].digest
    host.photon.view(hot)  # a trusted process (this one) verified and placed it
    assert host.photon.tiers["hot"].contains(hot)
    host.photon.stats.save()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k")
    r = subprocess.run([sys.executable, "-c", PROBE, str(cfg), str(kernel), hot.hex(),
                        cold.hex()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["hot_held"] and not out["cold_placed"]  # used what it found, placed nothing
    assert out["report"]["hot"]["hits"] == 1 and out["report"]["warm"]["hits"] == 1
    totals = json.loads((tmp_path / "store" / "tiers" / "stats.json").read_text())
    assert totals["hot"]["hits"] == 1  # the confined process's counters were saved
