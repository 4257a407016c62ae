"""Must-show 3: enrolling classes the engine never saw, closed-form update vs imprinting.

    python -m benchmarks enroll --engine /tmp/dev/eng90 --data ../shared/data/tiny-imagenet-100 --out runs/enroll

The engine directory comes from a bundle trained on the first 90 classes of the seeded order
(``edgecl train ... --set data.num_classes=90``); the 10 classes it never saw are enrolled one
after the other from the first ``--shots`` (20) train images of each (sorted by name, as the
quick profile sorts), with the device's own image path (OpenCV decode, fit_frame, ONNX Runtime).

Two evaluation sets, never used for training or enrollment:
* ``select``: train images 300-349 of every class (the quick bundle trained on images 0-99):
  the weighting is chosen on it: the best harmonic mean of old- and new-class accuracy, and
  among the weightings within ``TIE`` points of it (a tie at this sample size) the one that
  costs the old classes least;
* ``val``: the val/ folder (50 per class): the reported figures.

Rows: the closed-form rank-k update under several weightings (edgecl.device.enroll: alpha
weights a new class's rows in G, beta its Q column, by (n_ref / n_c)), and prototype imprinting
(class-mean columns, norm-matched). ``ms/class`` = projection + update of the heads per class
(median over the 10 classes; feature extraction, which includes the projection
h = ReLU(W_rand^T f) when it runs in the engine, excluded). Views are averaged in h.

Prints one JSON line per row as it goes, then the Markdown table (OUT/table.md) and the choice;
OUT/results.json has every row (``drift``: the enrolled head against a fresh solve), the chosen
weighting and the chosen views.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m benchmarks enroll"
TIE = 0.5


def list_images(folder: Path) -> list:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in {".jpeg", ".jpg", ".png"})


def load_frames(files: list, size: int) -> np.ndarray:
    """The files as ``edgecl enroll --images`` reads them (the one decode path, at the model's size)."""
    from edgecl.device.sources import read_file_frame

    return np.stack([read_file_frame(f, size) for f in files])


def features(rt, frames: np.ndarray) -> np.ndarray:
    return rt.features(frames, batch=64)["main"]


def cached(cache: Path, key: str, fn):
    f = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if f.is_file():
        return np.load(f)
    arr = fn()
    np.save(f, arr)
    return arr


def unseen_setup(engine: str, root: Path, cache: Path, prefix: str) -> tuple:
    """What the enrollment suites start from: (the engine's manifest, its model's sha256 (the
    feature caches' key), a quiet ONNX Runtime probe on a temporary store, the engine's classes,
    the classes of ``root``/train it never saw, the temporary folder (named ``prefix``...) the
    stores go in). Makes ``cache`` and prints the line naming the unseen classes."""
    from edgecl.device.engine_dir import read_manifest
    from edgecl.device.runtime import Runtime

    cache.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(engine)
    store_tmp = Path(tempfile.mkdtemp(prefix=prefix))
    rt = Runtime(engine, "ort-cpu", store=store_tmp / "probe", log=lambda m: None)
    old_names = list(rt.classes)
    new_names = [n for n in sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if n not in old_names]
    print(f"engine: {len(old_names)} classes; enrolling {len(new_names)} unseen: {', '.join(new_names)}", flush=True)
    return manifest, manifest.files["model.fp32.onnx"], rt, old_names, new_names, store_tmp


def evaluation_sets(rt, root: Path, order: list, sha: str, cache: Path) -> dict:
    """{"select": (features, labels), "val": ...} over the classes in ``order`` (labels = positions):
    select = train images 300-349 of each class, val = its val/ folder; cached by the model's sha."""

    def one(name, pick):
        files, labels = [], []
        for i, c in enumerate(order):
            fs = pick(c)
            files += fs
            labels += [i] * len(fs)
        key = f"{sha}:{name}:{len(files)}:{files[0]}:{files[-1]}"
        return cached(cache, key, lambda: features(rt, load_frames(files, rt.size))), np.asarray(labels)

    return {"select": one("select", lambda c: list_images(root / "train" / c)[300:350]),
            "val": one("val", lambda c: list_images(root / "val" / c))}


def accuracy(scores: np.ndarray, labels: np.ndarray, new_mask: np.ndarray) -> dict:
    hit = scores.argmax(1) == labels
    old, new = 100 * hit[~new_mask].mean(), 100 * hit[new_mask].mean()
    return {"old": round(float(old), 2), "new": round(float(new), 2), "all": round(float(100 * hit.mean()), 2),
            "hmean": round(float(2 * old * new / max(old + new, 1e-9)), 2)}


def tune_on_select(scores, grid, evals: dict, old: int) -> tuple:
    """(the value of ``grid`` whose ``scores("select", value)`` has the best harmonic mean of new and
    old accuracy (the first of equals), {evaluation set: accuracy at that value}); classes from
    ``old`` on are new."""
    y = evals["select"][1]
    best = float(max(grid, key=lambda v: accuracy(scores("select", v), y, y >= old)["hmean"]))
    return best, {name: accuracy(scores(name, best), labels, labels >= old) for name, (_F, labels) in evals.items()}


def imprint(head, rows_by_class: list, evals: dict, center: bool = False, tune: bool = False) -> dict:
    """Prototype imprinting: each new class's mean row as a column (normalised, Coral-style) beside
    the engine's ridge columns. ``center``: means taken after removing the mean h of the engine's
    data; ``tune``: the column scale picked on the select split (imprinting's best case), else the
    mean norm of the existing columns. Returns ``ms_per_class``, ``scale`` and per evaluation set
    (``evals``: {name: (features, labels)}, labels >= the engine's classes are new) the accuracy."""
    from edgecl.device.enroll import imprint_columns

    W = head.W
    _, Q, counts = head.base_statistics()
    mu = (Q.sum(1) / counts.sum()).astype(np.float32) if center else np.zeros(Q.shape[0], np.float32)
    t = time.perf_counter()
    W2 = imprint_columns(W, [rows - mu for rows in rows_by_class])
    ms = 1000 * (time.perf_counter() - t) / len(rows_by_class)
    Hs = {name: head.inputs(F) for name, (F, _) in evals.items()}
    k = W.shape[1]

    def scores(name, mult):
        return np.concatenate([Hs[name] @ W2[:, :k], (Hs[name] - mu) @ W2[:, k:] * mult], 1)

    mult, accs = tune_on_select(scores, 2.0 ** np.arange(-12, 4.01, 0.5) if tune else [1.0], evals, k)
    return {"ms_per_class": round(ms, 1), "scale": mult, **accs}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engine", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--cache", default="/tmp/edgecl-enroll-bench")
    ap.add_argument("--out", default="runs/enroll", help="Folder for table.md and results.json.")
    args = ap.parse_args(argv)

    from edgecl.device.enroll import ClassHeads, augment_views

    cache, root = Path(args.cache), Path(args.data)
    manifest, sha, rt, old_names, new_names, store_tmp = unseen_setup(args.engine, root, cache, "enroll-bench-")
    size, order = rt.size, old_names + new_names

    t0 = time.perf_counter()
    evals = evaluation_sets(rt, root, order, sha, cache)
    views_all = ("id", "flip", "crop", "cropflip")
    enroll_feats = {}
    for c in new_names:
        files = list_images(root / "train" / c)[:args.shots]
        key = f"{sha}:enroll4:{c}:{args.shots}"
        enroll_feats[c] = cached(cache, key, lambda files=files: features(rt, augment_views(load_frames(files, size),
                                                                                               views_all)))
    print(f"features ready ({time.perf_counter() - t0:.0f} s)")
    n = args.shots

    head = rt.heads.heads["main"]  # a RanPAC head
    enroll_h = {c: head.inputs(F) for c, F in enroll_feats.items()}  # the heads' inputs, per view

    def view_rows(H, views, average=False):
        """The rows of one class: its views' h, each a row or averaged per image."""
        parts = [H[views_all.index(v) * n:(views_all.index(v) + 1) * n] for v in views]
        return np.mean(parts, 0) if average else np.concatenate(parts)

    results = []

    def closed_form(label, policy, views, average=False):
        store = store_tmp / label.replace(" ", "_").replace("/", "-")
        heads = ClassHeads(args.engine, manifest, store, policy=policy, log=lambda m: None)
        heads.prepare()
        ms = []
        for c in new_names:
            info = heads.enroll(c, {"main": view_rows(enroll_h[c], views, average)})
            ms.append(info["update_ms"])
        ridge = heads.heads["main"].ridge()
        W = ridge.W.copy()
        drift = float(np.abs(W - ridge.solve_fresh()).max() / np.abs(W).max())
        row = {"method": label, "policy": policy, "views": list(views), "averaged": average,
               "rows_per_class": n if average else n * len(views), "drift": drift,
               "ms_per_class": round(float(np.median(ms)), 1), "ms_per_class_max": round(float(np.max(ms)), 1)}
        for name, (F, y) in evals.items():
            row[name] = accuracy(heads.logits({"main": F})["main"], y, y >= len(old_names))
        results.append(row)
        print(json.dumps(row))
        shutil.rmtree(store, ignore_errors=True)

    def imprinting(label, views, average=False, center=False, tune=False):
        res = imprint(head, [view_rows(enroll_h[c], views, average) for c in new_names], evals, center, tune)
        row = {"method": label, "views": list(views), "averaged": average, **res}
        results.append(row)
        print(json.dumps(row))

    # the engine before enrollment
    row = {"method": "engine before enrollment", "views": [], "averaged": False, "ms_per_class": 0}
    for name, (F, y) in evals.items():
        row[name] = accuracy(rt.heads.logits({"main": F})["main"], y, y >= len(old_names))
    results.append(row)
    print(json.dumps(row))
    v2 = ("id", "flip")
    imprinting("imprinting, norm-matched (Coral)", v2, True)
    imprinting("imprinting, scale tuned on select", v2, True, tune=True)
    imprinting("imprinting, centred, scale tuned on select", v2, True, center=True, tune=True)
    for alpha in (0.0, 0.5, 1.0):
        for beta in (0.0, 0.5, 1.0, 1.25, 1.5, 2.0):
            closed_form(f"closed form a={alpha:g} b={beta:g}", {"alpha": alpha, "beta": beta}, v2, average=True)
    grid = [r for r in results if "policy" in r]
    top = max(r["select"]["hmean"] for r in grid)  # within TIE points of it: tied (500 new-class images)
    best = max((r for r in grid if r["select"]["hmean"] >= top - TIE), key=lambda r: r["select"]["old"])
    pol = best["policy"]
    label = f"closed form a={pol['alpha']:g} b={pol['beta']:g}"
    closed_form(label, pol, ("id",))
    closed_form(label, pol, v2)
    closed_form(label, pol, views_all, average=True)
    closed_form(label, pol, views_all)
    shutil.rmtree(store_tmp, ignore_errors=True)
    same = [r for r in results if r.get("policy") == pol]  # the views, by the same rule
    top = max(r["select"]["hmean"] for r in same)
    best_views = max((r for r in same if r["select"]["hmean"] >= top - TIE), key=lambda r: r["select"]["old"])

    table_rows = []
    for r in results:
        views = "+".join(r["views"]) + (" averaged" if r["averaged"] else "")
        mark = " (chosen weighting)" if r is best else ""
        mark += " (chosen views)" if r is best_views else ""
        table_rows.append([f"{r['method']}{mark}", f"{views} ({r.get('rows_per_class', args.shots)})",
                           f"{r['select']['new']:.1f} / {r['select']['old']:.1f}", f"{r['val']['new']:.1f}",
                           f"{r['val']['old']:.1f}", f"{r['val']['all']:.1f}", r["ms_per_class"]])
    lines = markdown_table(["method", "views (rows/class)", "select new / old", "**val new**", "**val old**",
                            "val all", "ms/class"], table_rows)
    lines += ["", f"chosen on the select split (harmonic mean of new and old accuracy; within {TIE} points of the "
              f"best: the smallest cost to the old classes): {best['method']} {best['views']}"
              f"{' averaged' if best['averaged'] else ''}; threads: "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              f"chosen views (same rule): {'+'.join(best_views['views'])}"
              f"{' averaged' if best_views['averaged'] else ''}"]
    print()
    out = {"engine": args.engine, "new_classes": new_names, "shots": args.shots, "results": results,
           "chosen": best, "chosen_views": best_views}
    write_results(args.out, "\n".join(lines), out, PROG, argv)
    return 0
