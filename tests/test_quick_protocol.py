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


def test_safe_above_ranpac_and_above_both_its_learners(safe_run):
    """SAFE as it ships (the transfer loss on; raw logits and the fast statistics as accumulated,
    the aggregation form chosen on held-out training images, docs/METHODS.md; 4 fast epochs),
    seed 1993: 64.92 against RanPAC's 63.38, slow 64.18, fast 63.86 on two threads (65.02 against
    62.88, slow 63.96, fast 63.64 on one; docs/BENCHMARKS.md). Above RanPAC, and the entropy
    aggregate at least 0.3 above the better of its two learners (issue 16's bar; +0.74 measured);
    metrics.json records the weights per session and per class range."""
    _, bundle, m, ranpac = safe_run
    assert m["A_last"] > ranpac["A_last"]
    assert m["A_last"] >= max(m["slow"]["A_last"], m["fast"]["A_last"]) + 0.3
    last = m["per_session"][-1]
    assert len(last["w_slow_by_range"]) == 10 and abs(last["w_slow"] + last["w_fast"] - 1) < 1e-3
    temps = json.loads((bundle / "manifest.json").read_text())["learner"]["temperatures"]
    assert temps == {"slow": 1.0, "fast": 1.0}  # safe.temperature: none


def test_safe_eval_reproduces_bundle_accuracy(safe_run):
    data, bundle, m, _ = safe_run
    res = evaluate(str(bundle), str(data), progress=False)
    assert res["accuracy"] == pytest.approx(m["A_last"], abs=1e-6)
