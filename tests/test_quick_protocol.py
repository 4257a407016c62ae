"""The quick protocol on tiny-imagenet-100 (docs/DESIGN.md): the accuracy bars of the foundation
issue. Slow (SimpleCIL ~2 min, RanPAC ~10 min on 2 CPU cores): run with `pytest -m slow`."""

import json

import pytest
from helpers import tiny_imagenet_path

from edgecl.config import resolve_config
from edgecl.train import evaluate, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, request):
    data = tiny_imagenet_path()
    if data is None:
        pytest.skip("tiny-imagenet-100 not found")
    out = tmp_path_factory.mktemp("quick")
    results = {}
    for method in ("simplecil", "ranpac"):
        cfg = resolve_config(method, "quick", overrides={"data": {"root": str(data)}})
        results[method] = train(cfg, str(out / method), progress=False, log=lambda *_: None)
    return data, out, results


def test_simplecil_and_ranpac_bars(quick_runs):
    _, _, results = quick_runs
    assert results["simplecil"]["A_last"] >= 52.0
    assert results["ranpac"]["A_last"] >= results["simplecil"]["A_last"] + 3.0


def test_eval_reproduces_bundle_accuracy(quick_runs):
    data, out, results = quick_runs
    for method in ("simplecil", "ranpac"):
        res = evaluate(str(out / method), str(data), progress=False)
        assert res["n"] == 5000
        assert res["accuracy"] == pytest.approx(results[method]["A_last"], abs=1e-6)
        assert json.loads((out / method / "metrics.json").read_text())["A_last"] == results[method]["A_last"]


@pytest.fixture(scope="module")
def safe_run(quick_runs):
    """SAFE on the quick protocol (seed 1993; about 20 min on 2 CPU cores)."""
    data, out, results = quick_runs
    cfg = resolve_config("safe", "quick", overrides={"data": {"root": str(data)}})
    metrics = train(cfg, str(out / "safe"), progress=False, log=lambda *_: None)
    return data, out / "safe", metrics, results["ranpac"]


def test_safe_above_ranpac_with_weights_that_weigh(safe_run):
    """SAFE with the transfer loss, calibrated entropy aggregation and refreshed fast statistics
    (seed 1993; 63.98 against RanPAC's 63.38 when measured, docs/BENCHMARKS.md): above RanPAC, the
    aggregate between its learners and close to the better; after the last session the fast
    learner weighs more on the newest classes than on the oldest (the paper's Fig. 5), which the
    raw ridge logits' flat 0.50 / 0.50 could not show."""
    _, bundle, m, ranpac = safe_run
    assert m["A_last"] > ranpac["A_last"]
    best, worst = max(m["slow"]["A_last"], m["fast"]["A_last"]), min(m["slow"]["A_last"], m["fast"]["A_last"])
    assert worst < m["A_last"] and m["A_last"] >= best - 0.5
    last = m["per_session"][-1]["w_slow_by_range"]
    assert len(last) == 10 and last[0] - last[-1] > 0.05
    temps = json.loads((bundle / "manifest.json").read_text())["learner"]["temperatures"]
    assert all(t < 0.5 for t in temps.values())  # ridge logits are ~0..1: a sharpening temperature


def test_safe_eval_reproduces_bundle_accuracy(safe_run):
    data, bundle, m, _ = safe_run
    res = evaluate(str(bundle), str(data), progress=False)
    assert res["accuracy"] == pytest.approx(m["A_last"], abs=1e-6)
