"""Detection of a hardware-assisted /dev/kvm, on this machine and inside the lab."""

from __future__ import annotations

import json
import os
import sys

import pytest
from volt.cli import main
from volt.detect import THRESHOLD_NS, detect, require_assisted_kvm

from stellarium_core.errors import StellarError


def test_missing_device_is_reported_not_raised() -> None:
    det = detect("/nonexistent/kvm")
    assert (det.kvm_present, det.assisted) == (False, False)
    assert "does not exist" in det.reason


def test_non_kvm_device_fails_the_probe_and_points_to_the_lab() -> None:
    det = detect("/dev/null")
    assert det.kvm_present and not det.assisted
    assert "failed the probe" in det.reason
    with pytest.raises(StellarError, match="volt lab run"):
        require_assisted_kvm("/dev/null")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="this machine has no /dev/kvm")
def test_local_kvm_is_calibrated() -> None:
    """The probe guest runs (its port write and HLT were checked) and the verdict
    follows the measured speed."""
    det = detect()
    assert det.api_version == 12, det.reason
    assert det.ns_per_iteration is not None and det.ns_per_iteration > 0
    assert det.assisted == (det.ns_per_iteration <= THRESHOLD_NS)


def test_cli_json_matches_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["detect", "--json", "--device", "/dev/null"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["assisted"] is False and data["kvm_present"] is True


@pytest.mark.lab
def test_kvm_smoke_inside_lab_reports_working_kvm(lab, capsys: pytest.CaptureFixture[str]) -> None:
    """The KVM smoke program (the calibration guest) finds real KVM inside the lab; driven
    through `volt lab run`, whose exit code and stdout are the command's."""
    capsys.readouterr()
    rc = main(["lab", "run", "--timeout", "240", "--", sys.executable, "-m", "volt.detect",
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    data = json.loads(out)
    assert data["assisted"] is True and data["api_version"] == 12
    assert "volt lab: exit 0 in" in err
