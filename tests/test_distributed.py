"""Training on several processes (edgecl/distributed.py; docs/DESIGN.md, "Training on several
processes"): torchrun with Gloo on the CPU against one process.

- every learner's training steps and statistics: two ranks end where one process ends (PET
  weights, heads, G and Q, class means and covariances to 1e-4 relative), with the batch
  split unevenly and a rank left without images;
- the command line: ``torchrun -m edgecl train`` writes one bundle equal in statistics and
  accuracy to the one-process bundle, which ``edgecl eval`` evaluates to the same number;
- a rank that fails (an exception or SIGKILL) ends the run with a clear line and no bundle.
"""

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, invoke

WORKERS = Path(__file__).parent / "workers"
ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "EDGECL_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker`` (torchrun starts its workers in
    sessions of their own, so killing torchrun's process group would leave them running)."""
    for proc_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc_dir / "environ").read_bytes():
                os.kill(int(proc_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _run(cmd, tmp_path, timeout=300) -> subprocess.CompletedProcess:
    """``cmd``, and everything it starts killed if it hangs."""
    marker = f"EDGECL_TEST_RUN={uuid.uuid4().hex}"
    env = {**_env(tmp_path), "EDGECL_TEST_RUN": marker.split("=")[1]}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_marked(marker)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:8])} ... hung for {timeout} s:\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun(args, tmp_path, n=2, timeout=300):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args],
                tmp_path, timeout)


def _single(args, tmp_path, timeout=300):
    return _run([sys.executable, *args], tmp_path, timeout)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


@pytest.mark.parametrize("method", ["ranpac", "safe", "slcapp"])
def test_two_ranks_train_like_one_process(method, tmp_path):
    worker = str(WORKERS / "ddp_learner.py")
    one = _single([worker, method, str(tmp_path / "one.pt")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun([worker, method, str(tmp_path / "two.pt")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert sorted(a) == sorted(b)
    trained = [k for k in a if k.startswith("pet/")]
    assert trained, "the PET was trained"  # so the comparison covers the DDP steps
    if method == "slcapp":
        assert any(k.startswith("train_stats/cov") for k in a)
    else:
        assert any(k.endswith(".G") for k in a) and any(k.endswith(".Q") for k in a)
    worst = max((_rel(a[k], b[k]), k) for k in a if a[k].is_floating_point())
    assert worst[0] < 1e-4, f"{method}: {worst[1]} differs by {worst[0]:.2e} relative"


def _demo_data(tmp_path) -> Path:
    from edgecl.demo import write_digits_imagefolder

    return write_digits_imagefolder(tmp_path / "digits")


def _stats(bundle: Path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(bundle / "stats.safetensors")).items()}


@pytest.mark.slow  # about 40-75 s a method on two cores: in CI's slow step
@pytest.mark.parametrize("method", ["ranpac", "safe", "slcapp"])
def test_torchrun_cli_matches_one_process(method, tmp_path):
    """The demo's data, the statistics path (training off, so the features are bit-for-bit the
    same on every rank and the comparison is of the reductions): G and Q (SLCA++: the class
    statistics) to 1e-4, A_last to 0.5 point, one bundle, and ``edgecl eval`` of it the same."""
    data = _demo_data(tmp_path)
    args = ["train", "--method", method, "--profile", "demo", "--data", str(data), "--set", "data.num_classes=9",
            "--epochs", "0", "--set", "safe.fast_epochs=0", "--no-progress"]
    one = _single(["-m", "edgecl", *args, "--out", str(tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(["-m", "edgecl", *args, "--out", str(tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "torchrun: 2 processes (gloo)" in two.stdout
    assert two.stdout.count("A_last") == 1  # rank 0 speaks for the run
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(m1["A_last"] - m2["A_last"]) <= 0.5
    s1, s2 = _stats(tmp_path / "one"), _stats(tmp_path / "two")
    assert sorted(s1) == sorted(s2) and s1
    for k in s1:
        rel = float(np.linalg.norm(s1[k].astype(np.float64) - s2[k]) / max(np.linalg.norm(s1[k]), 1e-12))
        assert rel < 1e-4, f"{k}: {rel:.2e}"
    leftovers = [p.name for p in (tmp_path / "two").parent.iterdir() if p.name.startswith(".two")]
    assert not leftovers
    res = invoke(["eval", str(tmp_path / "two"), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.output)["accuracy"] - m2["A_last"]) < 1e-6


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_run_without_a_bundle(how, folder, tmp_path):
    out = tmp_path / "bundle"
    res = _torchrun([str(WORKERS / "crash_train.py"), how, "1", "--", "train", "--data", str(folder),
                     "--method", "ranpac", "--out", str(out), *TINY], tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode != 0
    if how == "raise":
        assert "failing on purpose in session 2" in text
    assert "rank 0: " in text and ("another rank of the run" in text), text[-3000:]
    assert not out.exists() or not any(out.iterdir()), "no partial bundle"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")], "no temporary directory left"
