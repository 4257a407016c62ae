"""The benchmark suites and the experiments run as packages from the repository root
(docs/BENCHMARKS.md, experiments/README.md): ``python -m benchmarks --help`` lists every suite
module of the package, and every suite's and experiment's ``--help`` exits 0. Fast: ``--help``
imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPERS = {"common"}  # modules of benchmarks/ that are not suites


def modules(package: str) -> list:
    return sorted(p.stem for p in (REPO / package).glob("*.py") if not p.stem.startswith("_") and p.stem not in HELPERS)


SUITES = modules("benchmarks")
EXPERIMENTS = modules("experiments")


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_packages_hold_the_suites_and_experiments():
    assert {"quick_protocol", "safe_ablation", "slca_ordering", "export", "enroll"} <= set(SUITES)
    assert {"safe_select", "safe_drift", "cov_forms"} <= set(EXPERIMENTS)
    assert not set(SUITES) & set(EXPERIMENTS)


def test_help_lists_every_suite_with_a_line_each():
    r = run_module("benchmarks", "--help")
    assert r.returncode == 0, r.stderr
    listing = r.stdout.split("suites:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1:] for line in listing}
    assert sorted(listed) == SUITES  # every module is registered in benchmarks/__main__.py, and only those
    assert all(summary for summary in listed.values())  # each with its one line


def test_unknown_or_missing_suite_is_a_usage_error():
    assert run_module("benchmarks", "no_such_suite").returncode == 2
    assert run_module("benchmarks").returncode == 2


@pytest.mark.parametrize("suite", SUITES)
def test_suite_help(suite):
    r = run_module("benchmarks", suite, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m benchmarks {suite}")
    assert "--out" in r.stdout  # every suite writes its table and results.json to --out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_help(name):
    r = run_module(f"experiments.{name}", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python -m experiments.{name}")


def test_experiments_readme_lists_every_experiment():
    text = (REPO / "experiments" / "README.md").read_text()
    assert [name for name in EXPERIMENTS if f"python -m experiments.{name}" not in text] == []


def test_no_script_edits_sys_path():
    offenders = [str(p.relative_to(REPO)) for package in ("benchmarks", "experiments")
                 for p in (REPO / package).glob("*.py") if "sys.path.insert" in p.read_text()]
    assert offenders == []


def test_a_finished_run_is_reused_only_with_its_own_recipe(tmp_path, monkeypatch):
    """run_quick(reuse=True) reads a finished run back when the options its method reads match:
    another method's section (here SAFE's defaults, changed after a RanPAC run was made) does
    not count; a RanPAC option does, and stops with a message."""
    import json

    monkeypatch.syspath_prepend(str(REPO))  # the suites run as packages from the repository root
    from benchmarks.common import run_quick
    from edgecl.config import resolve_config

    out = tmp_path / "ranpac-s1993"
    out.mkdir()
    cfg = resolve_config("ranpac", "quick", overrides={"data": {"root": "data"}, "seed": 1993}).to_dict()
    cfg["safe"]["refresh_fast"] = not cfg["safe"]["refresh_fast"]
    (out / "manifest.json").write_text(json.dumps({"config": cfg}))
    (out / "metrics.json").write_text(json.dumps({"A_last": 63.0, "time_s": 9.0}))
    assert run_quick("ranpac", 1993, "data", out, reuse=True) == {"A_last": 63.0, "time_s": 9.0, "wall_s": 9.0}
    with pytest.raises(SystemExit, match="another configuration"):
        run_quick("ranpac", 1993, "data", out, ["ranpac.M=64"], reuse=True)


def test_a_reused_run_without_a_predictor_stops_in_one_line(tmp_path, monkeypatch):
    """A finished run made before a predictor existed (e.g. SAFE's sigma-scaled aggregates) is
    named with the fix, not a KeyError; a run that has it gives its metrics."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.common import predictor_metrics

    m = {"aggregate": {"A_last": 64.0}}
    assert predictor_metrics(m, "aggregate", tmp_path) == {"A_last": 64.0}
    with pytest.raises(SystemExit, match=r"no 'aggregate_sigma' \(a run made by older code\); delete it"):
        predictor_metrics(m, "aggregate_sigma", tmp_path)
