"""The class-statistics store survives SIGKILL at any moment: a process enrolling classes in a
loop (printing a line after each committed enrollment) is killed at random moments 50 times;
after each kill the store loads and every enrollment reported as committed is in it."""

import os
import random
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
