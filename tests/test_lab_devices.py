"""devtools.lab_devices: a lab guest that hangs is run once more, with a warning; one that
hangs twice comes back as it hung (for the test to fail on)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from devtools.lab_devices import LabHangWarning, lab_scenario


class FakeLab:
    """Answers each run with the next console (a list of lines) as lab_vm.py would."""

    def __init__(self, *consoles: list[str]) -> None:
        self.consoles = list(consoles)
        self.runs = 0

    def run(self, cmd: list[str], **_: object) -> SimpleNamespace:
        self.runs += 1
        lines = [[float(i), text] for i, text in enumerate(self.consoles.pop(0))]
        out = {"lines": lines, "exit": -9 if lines[-1][1] == "LAB-VM-TIMEOUT" else 0}
        return SimpleNamespace(returncode=0, stdout=json.dumps(out) + "\n", stderr="")


def test_a_guest_that_hangs_once_is_run_again_with_a_warning() -> None:
    lab = FakeLab(["booting", "rcu: INFO: stall", "LAB-VM-TIMEOUT"], ["booting", "DONE"])
    with pytest.warns(LabHangWarning, match="(?s)plain guest hung.*rcu: INFO: stall"):
        out = lab_scenario(lab, "plain", {"argv": []})
    assert lab.runs == 2 and out["exit"] == 0 and out["console"] == "booting\nDONE"


def test_a_guest_that_hangs_twice_is_returned_hung() -> None:
    lab = FakeLab(["LAB-VM-TIMEOUT"], ["LAB-VM-TIMEOUT"])
    with pytest.warns(LabHangWarning):
        out = lab_scenario(lab, "plain", {"argv": []})
    assert lab.runs == 2 and out["exit"] == -9


def test_a_guest_that_ends_is_run_once() -> None:
    lab = FakeLab(["DONE"])
    assert lab_scenario(lab, "plain", {"argv": []})["console"] == "DONE" and lab.runs == 1
