r"""Export figures: parity, engine-directory accuracy (fp32 / int8) and ONNX Runtime CPU latency.

    python -m benchmarks export --bundle /tmp/runs/ranpac --data ../shared/data/tiny-imagenet-100 \
        --out /tmp/exp/bench [--int8] [--batch 1,32] [--threads 2]

Exports the bundle to OUT/engine-fp32 (OUT/engine-int8 with --int8), reads its parity report,
evaluates the engine directory on the val images at each precision (not with --skip-eval), and
times the exported graph (folded PET) against the bare backbone's graph (OUT/bare.onnx) at each
batch, the models taking turns. Prints the figures as a Markdown table (OUT/table.md) and writes
them to OUT/results.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, read_manifest, write_results

PROG = "python -m benchmarks export"


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

    learner, _ = load_learner(str(bundle))
    m = read_manifest(bundle)
    graph = ExportGraph({"main": learner.ptm}, m["input"]["mean"], m["input"]["std"])
    static_same_padding(graph, size)
    export_onnx(graph, path, size)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--calib-count", type=int, default=256)
    ap.add_argument("--calib-method", default="minmax")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-eval", action="store_true")
    a = ap.parse_args(argv)
    from edgecl.device.evaluate import evaluate_engine_dir
    from edgecl.export.exporter import export_bundle

    out = Path(a.out)
    res = {"bundle": a.bundle}
    eng = out / ("engine-int8" if a.int8 else "engine-fp32")
    export_bundle(a.bundle, eng, precision="int8" if a.int8 else "fp32", calib_count=a.calib_count,
                  calib_method=a.calib_method, log=lambda *_: None)
    manifest = read_manifest(eng)
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
    write_results(out, "\n".join(markdown_table(["figure", "value"], figure_rows(res))), res, PROG, argv)
    return 0


def figure_rows(res: dict) -> list:
    """[figure, value] rows of the results: bundle A_last, parity, accuracy per precision,
    latency per batch."""
    rows = [["bundle A_last", res["A_last_bundle"]]]
    for precision, rep in res["parity"].items():
        rows.append([f"parity {precision} ({rep.get('source')}): max abs / relative to feature scale, "
                     "top-1 agreement",
                     f"{rep['max_abs']:.2g} / {rep['max_rel']:.2g}, {100 * rep['top1_agreement']:.1f} %"])
    rows += [[f"engine dir accuracy, {k[len('accuracy_'):]}", v] for k, v in res.items() if k.startswith("accuracy_")]
    for k, lat in res.items():
        if k.startswith("latency_ms_b"):
            rows.append([f"latency, batch {k[len('latency_ms_b'):]} (ms, median)",
                         ", ".join(f"{name} {v}" for name, v in lat.items())])
    return rows
