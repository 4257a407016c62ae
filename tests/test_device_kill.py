"""The class-statistics store survives SIGKILL at any moment: a process enrolling classes in a
loop (printing a line after each committed enrollment) is killed at random moments 50 times;
after each kill the store loads and every enrollment reported as committed is in it."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from helpers import make_engine_dir

WORKER = r"""
import sys
import numpy as np
from edgecl.device.engine_dir import read_manifest
from edgecl.device.enroll import ClassHeads

eng, run = sys.argv[1], int(sys.argv[2])
heads = ClassHeads(eng, read_manifest(eng), log=lambda m: None)
rng = np.random.RandomState(run)
print("ready", heads.state.generation, flush=True)
for i in range(1000):
    name = f"r{run}-{i}"
    f = rng.randn(6, 24).astype(np.float32) + rng.randn(24).astype(np.float32)
    heads.enroll(name, heads.head_inputs({"main": f}))
    gen = heads.commit()
    print("committed", name, gen, flush=True)
"""


def test_store_survives_sigkill_50_times(tmp_path):
    from edgecl.device.engine_dir import read_manifest
    from edgecl.device.enroll import ClassHeads

    eng = make_engine_dir(tmp_path / "eng")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    rnd = random.Random(1993)
    committed, torn_leftovers, start = set(), 0, time.time()
    for run in range(50):
        p = subprocess.Popen([sys.executable, str(script), str(eng), str(run)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
        first = p.stdout.readline()
        assert first.startswith("ready"), first + p.stderr.read()
        time.sleep(rnd.uniform(0.0, 0.12))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        assert p.returncode == -signal.SIGKILL
        # a report the kill cut short (no trailing newline) names nothing for sure: only whole lines count
        committed |= {line.split()[1] for line in out.splitlines(keepends=True)
                      if line.startswith("committed") and line.endswith("\n") and len(line.split()) == 3}
        store = eng / "store"
        torn_leftovers += any(f.name.startswith(".") and f.name.endswith(".tmp") for f in store.glob(".*")) or \
            len(list(store.glob("gen-*.safetensors"))) != len(list(store.glob("gen-*.json")))
        heads = ClassHeads(eng, read_manifest(eng), log=lambda m: None)  # loads: newest good generation
        missing = committed - set(heads.classes)
        assert not missing, f"run {run}: committed but lost: {sorted(missing)[:5]}"
        assert heads.heads["main"].current.shape[1] == len(heads.classes)
    # the kills did land inside commits (temporary or uncommitted files were left behind)
    print(f"{len(committed)} committed enrollments, {torn_leftovers} kills mid-commit, {time.time() - start:.1f} s")
    assert len(committed) >= 50 and torn_leftovers >= 1
    final = ClassHeads(eng, read_manifest(eng), log=lambda m: None)
    ridge = final.heads["main"].ridge()
    fresh = ridge.solve_fresh()
    assert np.abs(ridge.W - fresh).max() <= 1e-3 * np.abs(fresh).max()  # the stored W matches its statistics


def _kill_at_random(argv, seconds: float, rnd, env) -> subprocess.CompletedProcess:
    """Run the CLI with ``argv`` and SIGKILL it after a random fraction of ``seconds``."""
    code = f"from edgecl.cli import main; main({argv!r})"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    time.sleep(rnd.uniform(0.0, seconds))
    p.send_signal(signal.SIGKILL)
    p.communicate()
    return p


def _classes_kept(eng: Path) -> set:
    """Every class committed to the engine's store, wherever an export put it (its store, or a
    store set aside beside it)."""
    from edgecl.core.formats import EngineManifest
    from edgecl.device.store import ClassStore, committed_generations, store_record

    found = set()
    for store in [eng / "store", *eng.parent.glob(f"{eng.name}.store-*")]:
        if not committed_generations(store):
            continue
        state = ClassStore(store, store_record(store).engine, log=lambda m: None).load()
        found |= {c.name for c in state.classes if c.uid is not None}
    assert EngineManifest.read(eng)  # the engine directory itself is whole
    return found


def test_export_and_merge_killed_at_any_moment_lose_no_committed_class(tmp_path, monkeypatch):
    """``export --force`` onto an engine directory with a store, and an in-place ``merge``, each
    killed at random moments: the engine directory stays whole and every committed class is
    still in a store (the engine's, or the one set aside beside it, as export says)."""
    from helpers import TINY, invoke, make_imagefolder

    from edgecl.device.runtime import Runtime

    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = make_imagefolder(tmp_path / "data")
    bundle, eng = tmp_path / "bundle", tmp_path / "eng"
    assert invoke(["train", "--data", str(data), "--method", "ranpac", "--out", str(bundle), *TINY]).exit_code == 0
    assert invoke(["export", str(bundle), "--out", str(eng)]).exit_code == 0
    rt = Runtime(eng, "ort-cpu", log=lambda m: None)
    frames = rt.fit(np.zeros((32, 32, 3), np.uint8))[None].repeat(4, 0)
    frames[:, :16] = 200
    rt.enroll_frames("kept", frames)
    rt.heads.commit()
    start = time.perf_counter()
    assert invoke(["export", str(bundle), "--out", str(eng), "--force"]).exit_code == 0
    export_s = time.perf_counter() - start
    rnd = random.Random(7)
    for _ in range(8):
        _kill_at_random(["export", str(bundle), "--out", str(eng), "--force"], 1.5 * export_s + 1.0, rnd, env)
        assert "kept" in _classes_kept(eng)
    # merge in place, killed at random: the store stays loadable with its classes
    store = next(s for s in [eng / "store", *tmp_path.glob("eng.store-*")] if (s / "gen-00000001.json").exists())
    other = tmp_path / "other"
    shutil.copytree(store, other)
    for _ in range(10):
        _kill_at_random(["merge", str(store), str(other), "--out", str(store)], 1.5, rnd, env)
        assert "kept" in _classes_kept(eng)
