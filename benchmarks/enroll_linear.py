"""Enrolling unseen classes into an SLCA-family engine: classifier alignment on the device vs imprinting.

    python -m benchmarks enroll_linear --engine /tmp/r17/eng-slcapp90 --data ../shared/data/tiny-imagenet-100 \\
        --out runs/enroll-linear

The engine directory comes from an SLCA-family bundle trained on the first 90 classes of the
seeded order (``edgecl train --method slcapp --profile quick --set data.num_classes=90``, then
``edgecl export``); the 10 classes it never saw are enrolled one after the other from the first
``--shots`` (20) train images of each, through the device's own path (OpenCV decode, fit, ONNX
Runtime, the enrollment views averaged per image, as ``edgecl enroll`` does).

Rows: the engine before enrollment; prototype imprinting on the linear head (each new class's
mean feature as a row, normalised and scaled to the mean norm of the engine's rows, the mean of
their biases as its bias: Coral's imprinting), with its scale tuned on the select split
(imprinting's best case), and centred (the mean feature of the engine's classes removed first,
scale tuned: the strongest imprinting here); the device's classifier alignment
(:mod:`edgecl.device.heads.linear`: the engine's recorded alignment re-run over every class's
statistics after each enrollment), and with fewer draws per class (``--draws``, cheaper on a
board); the enrolled classes' logit offset (in standard deviations of the engine's logits,
:meth:`~edgecl.device.heads.linear.LinearHead.logit_sd`) is chosen on the select split (the
best harmonic mean of new and old accuracy), the variants run without it. Evaluation
sets as ``python -m benchmarks enroll``: ``select`` = train images 300-349 of
every class (what imprinting's scale is tuned on), ``val`` = the val/ folder (the reported
figures). ``ms/class``: the update of the head per enrolled class (median; feature extraction
excluded); an alignment covers every class so far.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results
from benchmarks.enroll import (
    accuracy,
    cached,
    evaluation_sets,
    features,
    list_images,
    load_frames,
    tune_on_select,
    unseen_setup,
)

PROG = "python -m benchmarks enroll_linear"


def imprint_rows(head, rows_by_class: list, evals: dict, old: int, center: bool, tune: bool) -> dict:
    """Imprinting on a linear head (see the module docstring); returns ``ms_per_class``, ``scale``
    and the accuracy on each evaluation set."""
    from edgecl.device.enroll import imprint_columns

    W, b = head.weight, head.bias
    stats = head.base_statistics()
    mu = (stats.mean * stats.count[:, None]).sum(0) / stats.count.sum() if center else np.zeros(W.shape[1])
    mu = mu.astype(np.float32)
    t = time.perf_counter()
    W_new = imprint_columns(W.T, [rows - mu for rows in rows_by_class])[:, old:].T
    b_new = np.full(len(W_new), b.mean(), np.float32) - W_new @ mu
    ms = 1000 * (time.perf_counter() - t) / len(rows_by_class)

    def scores(name, mult):
        F = evals[name][0]
        return np.concatenate([F @ W.T + b, (F @ W_new.T + b_new) * mult], 1)

    mult, accs = tune_on_select(scores, 2.0 ** np.arange(-6, 4.01, 0.25) if tune else [1.0], evals, old)
    return {"ms_per_class": round(ms, 2), "scale": mult, **accs}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engine", required=True, help="an SLCA-family engine directory trained on 90 classes")
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (ImageFolder with train/ and val/)")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--draws", type=int, nargs="*", default=[64],
                    help="also align with this many draws per class and epoch (the engine's own count always runs)")
    ap.add_argument("--cache", default="/tmp/edgecl-enroll-bench")
    ap.add_argument("--out", default="runs/enroll-linear")
    args = ap.parse_args(argv)

    from edgecl.device.enroll import DEFAULT_VIEWS, ClassHeads, augment_views, view_rows

    cache, root = Path(args.cache), Path(args.data)
    manifest, sha, rt, old_names, new_names, store_tmp = unseen_setup(args.engine, root, cache, "enroll-linear-")
    quiet = lambda m: None  # noqa: E731
    head = rt.heads.heads["main"]
    if getattr(head, "spec", None) is None:  # the linear head's recorded alignment
        raise SystemExit(f"{args.engine}: not an SLCA-family engine with its alignment (RanPAC engines: "
                         f"python -m benchmarks enroll)")
    order, old = old_names + new_names, len(old_names)
    t0 = time.perf_counter()
    evals = evaluation_sets(rt, root, order, sha, cache)
    rows = {}
    for c in new_names:
        files = list_images(root / "train" / c)[:args.shots]
        feats = cached(cache, f"{sha}:enroll-views:{c}:{args.shots}:{'+'.join(DEFAULT_VIEWS)}",
                       lambda files=files: features(rt, augment_views(load_frames(files, rt.size), DEFAULT_VIEWS)))
        rows[c] = view_rows(feats, len(DEFAULT_VIEWS))  # one row per image: the mean of its views (the device's)
    print(f"features ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    results = []

    def report(row):
        results.append(row)
        print({k: row[k] for k in ("method", "ms_per_class", "select", "val") if k in row}, flush=True)

    row = {"method": "engine before enrollment", "ms_per_class": 0}
    for name, (F, y) in evals.items():
        row[name] = accuracy(rt.heads.logits({"main": F})["main"], y, y >= old)
    report(row)
    imprint = [rows[c] for c in new_names]
    report({"method": "imprinting, norm-matched (Coral)", **imprint_rows(head, imprint, evals, old, False, False)})
    report({"method": "imprinting, scale tuned on select", **imprint_rows(head, imprint, evals, old, False, True)})
    report({"method": "imprinting, centred, scale tuned on select",
            **imprint_rows(head, imprint, evals, old, True, True)})

    from edgecl.device.heads.linear import INITS, LinearHead

    spec = manifest.learners["main"].alignment
    runs = [(init, borrow, spec.samples_per_class) for borrow in (False, True) for init in INITS]
    runs += [(LinearHead.init, LinearHead.borrow, d) for d in args.draws if d != spec.samples_per_class]
    default = (LinearHead.init, LinearHead.borrow, spec.samples_per_class)
    for init, borrow, draws in runs:
        heads = ClassHeads(args.engine, manifest, store_tmp / f"align-{init}-{borrow}-{draws}", log=quiet)
        lin = heads.heads["main"]
        lin.facts = dataclasses.replace(lin.facts, alignment=dataclasses.replace(spec, samples_per_class=draws))
        lin.init, lin.borrow = init, borrow
        if (init, borrow, draws) != default:
            lin.offset = 0.0  # the variants without the offset (the default has the configured one)
        heads.prepare()
        ms = []
        for c in new_names:
            ms.append(heads.enroll(c, {"main": rows[c]})["update_ms"])
        label = (f"classifier alignment on the device, {init} init" + (", nearest class's scatter" if borrow else "")
                 + (" (the default)" if (init, borrow, draws) == default else ""))
        row = {"method": label, "init": init, "borrow": borrow, "draws_per_class": draws, "epochs": spec.epochs,
               "ms_per_class": round(float(np.median(ms)), 1), "ms_last": round(float(ms[-1]), 1)}
        logits = {name: heads.logits({"main": F})["main"] for name, (F, _y) in evals.items()}
        for name, (_F, y) in evals.items():
            row[name] = accuracy(logits[name], y, y >= old)
        report(row)
        if (init, borrow, draws) == default:  # the offset of the enrolled logits, chosen on select
            lin.offset = 0.0
            logits = {name: heads.logits({"main": F})["main"] for name, (F, _y) in evals.items()}
            report({"method": "the default without the offset", "offset_sd": 0.0, "ms_per_class": row["ms_per_class"],
                    **{name: accuracy(logits[name], y, y >= old) for name, (_F, y) in evals.items()}})
            sd = lin.logit_sd()

            def shifted(name, k, logits=logits, sd=sd):
                out = logits[name].copy()
                out[:, old:] += k * sd
                return out
            k, accs = tune_on_select(shifted, np.arange(-2, 4.01, 0.125), evals, old)
            row = {"method": f"the default with the offset best on select ({k:g} sd; the default's is "
                             f"{LinearHead.offset:g})", "offset_sd": k, "ms_per_class": row["ms_per_class"], **accs}
            report(row)
    shutil.rmtree(store_tmp, ignore_errors=True)

    table = []
    for r in results:
        what = f"{r['method']}" + (f", {r['draws_per_class']} draws/class x {r['epochs']} epochs"
                                  if "draws_per_class" in r else "")
        table.append([what, f"{r['select']['new']:.1f} / {r['select']['old']:.1f}", f"{r['val']['new']:.1f}",
                      f"{r['val']['old']:.1f}", f"{r['val']['all']:.1f}", r["ms_per_class"]])
    lines = markdown_table(["method", "select new / old", "**val new**", "**val old**", "val all", "ms/class"],
                           table)
    lines += ["", f"{old} engine classes, {len(new_names)} enrolled with {args.shots} images each (views "
              f"{'+'.join(DEFAULT_VIEWS)} averaged); threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"]
    write_results(args.out, "\n".join(lines), {"engine": args.engine, "new_classes": new_names, "shots": args.shots,
                                               "alignment": dataclasses.asdict(spec), "results": results}, PROG, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
