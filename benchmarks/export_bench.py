"""Export figures: parity, engine-dir accuracy (fp32 / int8) and ONNX Runtime CPU latency of
the exported graph (folded PET) against the bare backbone's graph at the same batch.

    python benchmarks/export_bench.py --bundle /tmp/runs/ranpac --data ../shared/data/tiny-imagenet-100 \
        --out /tmp/exp/bench [--int8] [--batch 1,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def latencies_ms(paths: dict, batch: int, size: int, threads: int, rounds: int = 10, reps: int = 5) -> dict:
    """Median latency per model; the models take turns (``rounds`` x ``reps`` runs each), so
    a slow spell of a shared machine hits them alike."""
    from edgecl.export.parity import ort_session

    sessions = {name: ort_session(path, threads) for name, path in paths.items()}
    x = np.random.RandomState(0).randint(0, 256, (batch, size, size, 3)).astype(np.uint8)
    times = {name: [] for name in sessions}
    for sess in sessions.values():
        for _ in range(3):
            sess.run(None, {"input": x})
    for _ in range(rounds):
        for name, sess in sessions.items():
            for _ in range(reps):
                t = time.perf_counter()
                sess.run(None, {"input": x})
                times[name].append(time.perf_counter() - t)
    return {name: round(1000 * float(np.median(t)), 3) for name, t in times.items()}


def bare_graph(bundle, path, size) -> None:
    """The bundle's backbone without PET, exported the same way."""
    from edgecl.export.graph import ExportGraph, export_onnx, static_same_padding
    from edgecl.train import load_learner

    learner, m = load_learner(str(bundle))
    graph = ExportGraph({"main": learner.ptm}, m["input"]["mean"], m["input"]["std"])
    static_same_padding(graph, size)
    export_onnx(graph, path, size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-eval", action="store_true")
    a = ap.parse_args()
    from edgecl.device.evaluate import evaluate_engine_dir
    from edgecl.export.exporter import export_bundle

    out = Path(a.out)
    res = {"bundle": a.bundle}
    eng = out / ("engine-int8" if a.int8 else "engine-fp32")
    manifest = export_bundle(a.bundle, eng, precision="int8" if a.int8 else "fp32", calib_count=a.calib_count,
                             calib_method=a.calib_method, log=lambda *_: None)
    size = manifest["input"]["size"]
    res["A_last_bundle"] = manifest["source_bundle"]["A_last"]
    res["parity"] = json.loads((eng / "parity.json").read_text())
    for p in manifest["models"]:
        if not a.skip_eval:
            res[f"accuracy_{p}"] = evaluate_engine_dir(eng, a.data, precision=p, progress=False)["accuracy"]
    bare = out / "bare.onnx"
    bare_graph(a.bundle, bare, size)
    for b in [int(v) for v in a.batch.split(",")]:
        lat = latencies_ms({"bare": bare, **{p: eng / manifest["models"][p]["file"] for p in manifest["models"]}},
                           b, size, a.threads)
        lat["folded_vs_bare"] = f"{100 * (lat['fp32'] / lat['bare'] - 1):+.1f}%"
        res[f"latency_ms_b{b}"] = lat
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
