"""Snapshot and restore of real Linux in the nested KVM lab: a guest that counts (one tick
a second) is snapshotted through the API (Full, then a Diff two ticks later) and
restored as three clones at once, two of the Full one and one of the Diff; each counts
on from where its snapshot stopped it."""

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
    assert got["snap_create_rc"] == 0 and got["snap2_create_rc"] == 0, got
    full, diff = got["snap"], got["snap2"]
    assert full["memory_mib"] == 128 and full["kind"] == "Full", full
    assert full["stored_mib"] < 128, full                    # zero pages are not stored
    assert diff["kind"] == "Diff", diff
    lasts = [got["snap_ticks_before"][-1], got["snap2_ticks_before"][-1]]
    assert lasts[0] >= 3 and lasts[1] >= lasts[0] + 2, got
    for clone, last in zip(got["clones"], (lasts[0], lasts[0], lasts[1]), strict=True):
        ticks = clone["ticks"]
        # it counts on from its snapshot, not from a fresh boot's 1
        assert len(ticks) >= 2 and ticks[0] in (last, last + 1), (last, clone)
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), clone
