"""Issue 18, must-show 3, on real images: a RanPAC quick engine trained on 70 tiny-imagenet-100
classes and exported with its held-out calibration; 10 unseen classes enrolled on the device
(20 train images each); their val images are accepted at the target rate, and 10 further unseen
classes are rejected about as often as before (the engine and the check of ``python -m benchmarks
open_set --enroll-engine``, docs/DEVICE.md). About 8 minutes."""

import pytest
from helpers import invoke, tiny_imagenet_path

pytestmark = pytest.mark.slow


def test_enrolled_classes_accepted_at_target_and_unseen_still_rejected(tmp_path, monkeypatch):
    from pathlib import Path

    from benchmarks.open_set import enrollment_check

    data = tiny_imagenet_path()
    if data is None:
        pytest.skip("tiny-imagenet-100 not found")
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    bundle, eng = tmp_path / "bundle", tmp_path / "engine"
    res = invoke(["train", "--data", str(data), "--method", "ranpac", "--profile", "quick", "--seed", "1993",
                  "--set", "data.num_classes=70", "--no-progress", "--out", str(bundle)])
    assert res.exit_code == 0, res.output
    res = invoke(["export", str(bundle), "--out", str(eng)])
    assert res.exit_code == 0, res.output
    assert "unknown rejection: maxlogit score" in res.output
    r = enrollment_check(str(eng), Path(data), tmp_path / "features")
    target = 0.95
    print(r)
    assert abs(r["before"]["known"] - target) <= 0.02, r  # the operating point holds on val
    assert abs(r["after"]["enrolled"] - target) <= 0.03, r  # enrolled classes: accepted at the target rate
    assert abs(r["after"]["known"] - target) <= 0.02, r
    # the further unseen classes: rejected within 5 points of before
    assert (1 - r["after"]["unseen"]) >= (1 - r["before"]["unseen"]) - 0.05, r
    assert r["held_out_accept_after"] >= target  # the recomputed threshold accepts the target on held-out
