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
