"""Snapshot and restore of real Linux in the nested KVM lab: a guest that counts (one tick
a second) is snapshotted through the API and restored as two clones at once; each
counts on from where the snapshot stopped it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from volt.kernels.initramfs import base_archive

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from test_vmm_lab import TICKER_INIT  # noqa: E402


@pytest.mark.lab
@pytest.mark.slow
def test_a_ticking_guest_ticks_on_in_two_clones_of_its_snapshot(lab, guest_kernel, tmp_path):
    cfg = tmp_path / "host.toml"
    cfg.write_text('[store]\npath = "store"\n')
    r = subprocess.run([sys.executable, "-m", "stellarium_core", "--config", str(cfg), "host",
                        "init"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ticker = base_archive(TICKER_INIT).write(tmp_path / "ticker.cpio")
    volt = str(Path(sys.executable).with_name("volt"))
    res = lab.run([sys.executable, str(HERE / "lab_snapshot.py"), volt, str(cfg),
                   str(guest_kernel.bzimage), str(ticker)], timeout=1200,
                  writable=[tmp_path / "store"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(got, indent=1))
    assert got["create_rc"] == 0, got
    snap = got["snapshot"]
    assert snap["memory_mib"] == 128 and snap["kind"] == "Full", snap
    assert snap["stored_mib"] < 128, snap                    # zero pages are not stored
    last = got["ticks_before"][-1]
    assert last >= 3, got
    for clone in got["clones"]:
        ticks = clone["ticks"]
        # it counts on from the snapshot, not from a fresh boot's 1
        assert len(ticks) >= 2 and ticks[0] in (last, last + 1), (last, clone)
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), clone
