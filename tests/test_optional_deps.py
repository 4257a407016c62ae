"""A missing optional dependency is one line naming the pip extra that brings it (edgecl/core/extras.py).

Each case runs the CLI in a fresh interpreter with one module made unimportable
(``sys.modules[name] = None``), as on a machine without it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgecl.core.extras import OPTIONAL, missing_message


def run_blocked(blocked: str, argv: list, cwd) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from edgecl.cli import main\n"
            f"main({argv!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, check=False)


@pytest.fixture
def fake_engine_dir(tmp_path):
    """Enough of an engine directory for the CLI to take the engine path (the dependency check
    comes before anything is read)."""
    eng = tmp_path / "engine"
    eng.mkdir()
    (eng / "manifest.json").write_text(json.dumps({"format": "edgecl-engine", "format_version": 1}))
    return eng


CASES = {
    # blocked module: (argv, extra named in the message)
    "torch": (["train", "--data", "d", "--method", "ranpac", "--out", "o"], "train"),
    "matplotlib": (["train", "--data", "d", "--method", "ranpac", "--out", "o"], "train"),
    "onnx": (["export", "no-bundle", "--out", "o"], "train"),
    "tensorrt": (["export", "no-bundle", "--out", "o", "--trt"], "trt"),
    "onnxruntime": (["eval", "{engine}", "--data", "d"], "device"),
    "cv2": (["run", "{engine}", "--source", "nowhere"], "device"),
    "scipy": (["demo", "--out", "o"], "device"),
}


@pytest.mark.parametrize("blocked", sorted(CASES))
def test_missing_optional_dependency_is_one_line_naming_the_extra(blocked, fake_engine_dir, tmp_path):
    argv, extra = CASES[blocked]
    argv = [a.replace("{engine}", str(fake_engine_dir)) for a in argv]
    res = run_blocked(blocked, argv, tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("edgecl: error: edgecl "), res.stderr
    assert f"({blocked})" in lines[0] and f"pip install 'edgecl[{extra}]'" in lines[0], lines[0]
    assert not any(tmp_path.glob("o*")), "the command did work before refusing"


def test_every_optional_module_has_an_extra_that_installs_it():
    """Each entry of the table names an extra of pyproject.toml that lists its distribution
    (directly or through an extra it includes), and the base install lists none of them."""
    import re
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs):
        return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    def closure(extra):
        reqs = extras[extra]
        out = names(reqs)
        for inner in re.findall(r"edgecl\[(\w+)\]", " ".join(reqs)):
            out |= closure(inner)
        return out

    base = names(project["dependencies"])
    for module, (_what, extra, dist) in OPTIONAL.items():
        assert extra in extras, (module, extra)
        assert dist in closure(extra), (module, dist, extra)
        assert dist not in base, (module, dist)


def test_a_missing_module_deep_inside_a_command_is_translated_too(monkeypatch):
    """The CLI's backstop: a ModuleNotFoundError of an optional module from anywhere in a command."""
    from click.testing import CliRunner

    import edgecl.device.evaluate as ev
    from edgecl.cli import cli

    def boom(*a, **k):
        raise ModuleNotFoundError("No module named 'onnx.helper'", name="onnx.helper")

    monkeypatch.setattr(ev, "evaluate_engine_dir", boom)
    monkeypatch.setattr("edgecl.core.formats.artifact_format", lambda p: "edgecl-engine")
    res = CliRunner().invoke(cli, ["eval", "x", "--data", "d"])
    assert res.exit_code == 2
    assert res.output.strip() == "edgecl: error: " + missing_message("onnx.helper", "edgecl eval")
    assert "pip install 'edgecl[train]'" in res.output


def test_unknown_missing_modules_are_not_dressed_up():
    assert missing_message("no_such_module", "edgecl x") is None
    assert set(OPTIONAL) >= {"onnx", "onnxruntime", "cv2", "tensorrt", "matplotlib", "scipy", "torch"}
