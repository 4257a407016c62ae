"""Helpers shared by the benchmark suites (``python -m benchmarks SUITE``) and the experiments
(``python -m experiments.NAME``).

- :func:`run_quick`: one ``edgecl train --profile quick`` run, or a finished one read back when
  it was trained with the same configuration;
- :func:`read_manifest`: a bundle's or engine directory's manifest as plain JSON;
- :func:`mean_std`: "mean ± std" over seeds or draws, as the tables print it;
- :func:`markdown_table`: the lines of a Markdown table;
- :func:`write_results`: the Markdown table and the machine-readable results beside it, with
  the command line, the git commit, the date and the machine's CPU count.

Heavy modules (torch, the trainer) are imported inside the functions that need them, so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# settings that do not change what a run learns
_NOT_RECIPE = {"data": ("cache_dir", "workers"), "train": ("device", "threads")}
# config sections only some learners read (edgecl.config.Config): a run of another method records
# them too, and their defaults changing does not change that run
_OWNED_SECTIONS = {"safe": {"safe"}, "slca": {"slca", "slcapp", "seqft"}}


def _recipe(config: dict) -> dict:
    d = json.loads(json.dumps(config))
    for section, methods in _OWNED_SECTIONS.items():
        if d.get("method") not in methods:
            d.pop(section, None)
    for section, keys in _NOT_RECIPE.items():
        for k in keys:
            d[section].pop(k, None)
    for k in ("root", "val_root"):
        if d["data"].get(k):
            d["data"][k] = os.path.realpath(d["data"][k])
    return d


def _differs(done, want) -> bool:
    """A recorded config section (or value) against the wanted one, on the options both have."""
    if isinstance(done, dict) and isinstance(want, dict):
        return any(done[o] != want[o] for o in done.keys() & want.keys())
    return done != want


def run_quick(method: str, seed: int, data: str, out: Path, sets=(), reuse: bool = False) -> dict:
    """One `edgecl train --profile quick` run; returns its metrics (plus wall_s).

    With ``reuse``, a finished run already in ``out`` is read back instead (so an interrupted
    benchmark resumes, and seeds can run in separate processes sharing one --out), provided it
    was trained with the same configuration (the options both record); a different one stops
    with a message. A run made by older code is not detected: delete --out after changing the
    code when the change matters to what is read back.
    """
    from edgecl.config import parse_set, resolve_config
    from edgecl.train import train

    overrides = parse_set(sets)
    overrides.setdefault("data", {})["root"] = data
    overrides["seed"] = seed
    cfg = resolve_config(method, "quick", None, overrides)
    out = Path(out)
    if reuse and (out / "metrics.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        done, want = _recipe(manifest["config"]), _recipe(cfg.to_dict())
        # bundles keep their method's sections, and a run made before an option existed lacks it
        if any(_differs(done[k], want[k]) for k in done.keys() & want.keys()):
            raise SystemExit(f"{out}: holds a finished run with another configuration than "
                             f"{method} {' '.join(sets)}; delete it or choose another --out")
        m = json.loads((out / "metrics.json").read_text())
        return m | {"wall_s": m.get("time_s")}
    start = time.perf_counter()
    m = train(cfg, str(out), progress=False, log=lambda *_: None)
    m["wall_s"] = round(time.perf_counter() - start, 1)
    return m


def predictor_metrics(m: dict, key: str, out) -> dict:
    """``m[key]``, one predictor's metrics of the finished run in ``out``; one clear line when the
    run was made before that predictor existed (``run_quick`` cannot tell older code's runs)."""
    if key not in m:
        raise SystemExit(f"{out}: its metrics.json has no {key!r} (a run made by older code); "
                         "delete it or choose another --out")
    return m[key]


def read_manifest(folder) -> dict:
    """The ``manifest.json`` of a run bundle or an engine directory, as the JSON it is on disk
    (the artifact format, docs/DESIGN.md "Artifact formats"), whatever Python type edgecl's
    readers wrap it in."""
    f = Path(folder) / "manifest.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{f}: cannot be read ({exc}); give a run bundle or an engine directory") from None


def mean_std(values, bare_single: bool = True) -> str:
    """``"mean ± std"`` with two decimals (std with ddof 0); one value alone is printed bare
    unless ``bare_single`` is false."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    if bare_single and len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f}"


def markdown_table(header, rows) -> list:
    """The lines of a Markdown table: the header, the rule, one line per row (cells as str)."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of a suite or experiment: ``prog`` is how it is run (``python -m
    benchmarks quick_protocol``), the module's docstring is the description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def summaries(package_dir: Path, skip=("common",)) -> dict:
    """``{module: first line of its docstring}`` for the modules of a package folder, read
    without importing them (dunder modules and ``skip`` left out)."""
    out = {}
    for f in sorted(Path(package_dir).glob("*.py")):
        if f.stem.startswith("_") or f.stem in skip:
            continue
        doc = (ast.get_docstring(ast.parse(f.read_text(encoding="utf-8"))) or "").strip()
        out[f.stem] = doc.splitlines()[0].replace("``", "`") if doc else ""
    return out


def git_commit():
    """``(commit, dirty)`` of the repository this file is in, or ``(None, None)`` outside git.
    Read-only: ``--no-optional-locks`` keeps ``git status`` from refreshing the index."""
    def git(*args):
        return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def run_info(prog: str, argv) -> dict:
    """What reproduces a result: the command line, the git commit, the date, the machine."""
    commit, dirty = git_commit()
    return {"command": " ".join([prog, *(shlex.quote(a) for a in argv)]),
            "argv": list(argv),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "commit": commit,
            "dirty": dirty,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count()}


def write_json(path: Path, results, prog: str, argv) -> Path:
    """``{**run_info, "results": results}`` as JSON at ``path`` (written beside and renamed into
    place, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**run_info(prog, argv), "results": results}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_results(out, table: str, results, prog: str, argv, md: str = "table.md",
                  json_name: str = "results.json") -> Path:
    """Prints the Markdown ``table`` and writes it to ``OUT/md``, with the machine-readable
    ``results`` in ``OUT/json_name`` (:func:`write_json`). Returns ``out``."""
    print(table)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / md).write_text(table + "\n")
    write_json(out / json_name, results, prog, argv)
    return out
