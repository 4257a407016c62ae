"""Unknown rejection and confidence: which score, how well, and whether the operating point holds.

    python -m benchmarks open_set --engines E1 E2 E3 ES --data ../shared/data/tiny-imagenet-100 \\
        [--enroll-engine E70] [--out runs/open-set]

Each engine directory is a quick-profile bundle trained on 90 of the 100 classes (RanPAC seeds
1993, 1, 25 and SAFE seed 1993: ``edgecl train ... --set data.num_classes=90``), exported with
its held-out calibration (``edgecl export``: training images 100-119 of each class, which the
quick profile never trains on). The classes an engine never saw are its unknowns.

1. The score is chosen on held-out *training* images (``select``: train images 300-349 of every
   class; the engine's classes are the known, the others the unknown): the largest mean AUROC
   over the engines among ``msp`` (fitted temperature), ``energy``, ``maxlogit`` (on the logits
   the engine predicts) and ``mahalanobis`` (the ridge head's class means Q_c / n_c and shared
   within-class covariance with its 64 leading eigenpairs; SAFE: the two learners' distances summed).
2. Reported on val (never used to choose anything): per engine, the chosen score's AUROC and FPR
   at 95 % TPR against the max-softmax baseline (``edgecl eval --unknown-data`` computes the same),
   the share of known images accepted at the engine's threshold (target 95 %), and the ECE of the
   reported confidence (uncalibrated, temperature only, temperature + confidence map).
   And the operating points: known accepted and unknown rejected at ``--accept-rate`` 0.95 ... 0.5.
3. ``--enroll-engine`` (trained on 70 classes): the first 10 of its unseen classes are enrolled on
   the device (20 train images each, four views averaged), and the next 10 stay unseen; the val
   acceptance of the enrolled classes, the known classes and the unseen ones, before and after,
   with the threshold the device recomputes and with the threshold frozen at export.

Writes OUT/table.md, OUT/results.json, OUT/reliability.png (reliability diagrams) and
OUT/scores.png (known vs unknown score histograms).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results
from benchmarks.enroll import list_images, load_frames

PROG = "python -m benchmarks open_set"
SHOTS = 20
VIEWS = ("id", "flip", "crop", "cropflip")
RATES = (0.95, 0.9, 0.8, 0.7, 0.5)


def cached_features(rt, sha: str, key: str, files: list, cache: Path) -> dict:
    """{learner: features} of the image files through the engine (cached by model sha and file list)."""
    digest = hashlib.sha256(f"{sha}:{key}:{len(files)}:{files[0]}:{files[-1]}".encode()).hexdigest()[:16]
    f = cache / f"openset-{digest}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    frames = load_frames(files, rt.size)
    feats = {ln: v for ln, v in rt.features(frames, batch=64).items() if ":" not in ln}
    np.savez(f, **feats)
    return feats


def engine_sets(engine: str, root: Path, cache: Path) -> dict:
    """The runtime of ``engine`` and the features of its evaluation sets: select (train 300-349) and
    val of every class, labels = position in (engine classes, then the others)."""
    from edgecl.device.runtime import Runtime

    cache.mkdir(parents=True, exist_ok=True)
    probe = Path(tempfile.mkdtemp(prefix="open-set-"))
    rt = Runtime(engine, "ort-cpu", store=probe / "store", project_in_engine=False, log=lambda m: None)
    sha = rt.manifest.files["model.fp32.onnx"]
    old = list(rt.classes)
    names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    order = old + [n for n in names if n not in old]
    sets = {}
    for name, pick in (("select", lambda c: list_images(root / "train" / c)[300:350]),
                       ("val", lambda c: list_images(root / "val" / c))):
        files, labels = [], []
        for i, c in enumerate(order):
            fs = pick(c)
            files += fs
            labels += [i] * len(fs)
        sets[name] = (cached_features(rt, sha, name, files, cache), np.asarray(labels))
    return {"rt": rt, "probe": probe, "old": old, "order": order, "sets": sets, "sha": sha}


def mahalanobis_scorer(rt, k: int = 64):
    """features -> minus the summed (over learners) smallest Mahalanobis distance in each ridge
    head's input space, the covariance from the engine's G, Q and counts."""
    from edgecl.device.openset import mahalanobis, shared_covariance

    parts = {}
    for ln, head in rt.heads.heads.items():
        G, Q, counts = head.base_statistics()
        parts[ln] = (head, *shared_covariance(G, Q, counts, k))
    return lambda feats: sum(mahalanobis(head.inputs(feats[ln]), means, cov)
                             for ln, (head, means, cov) in parts.items())


def measure(split: dict) -> dict:
    """Every candidate score on select and val, and the calibration figures on val."""
    from edgecl.device.openset import SCORES, auroc, confidence, ece, fpr_at_tpr, msp, reliability, threshold_for

    rt = split["rt"]
    k = len(split["old"])
    cal = rt.open_set.calib
    T = cal.temperature
    maha = mahalanobis_scorer(rt)
    out = {"candidates": {}, "val": {}}
    for name, (feats, y) in split["sets"].items():
        logits = rt.predict_features(feats)[0]
        known = y < k
        scores = {s: fn(logits, T) for s, fn in SCORES.items()}
        scores["mahalanobis"] = maha(feats)
        for s, v in scores.items():
            out["candidates"].setdefault(s, {})[name] = round(auroc(v[known], v[~known]), 4)
        if name == "val":
            chosen = rt.open_set.scores(logits)
            thr = rt.open_set.threshold()
            lk, yk = logits[known], y[known]
            correct = lk.argmax(1) == yk
            confs = {"uncalibrated": confidence(lk), "temperature": confidence(lk, T),
                     "calibrated": confidence(lk, T, cal.platt)}
            held = rt.open_set.held_out_scores()
            points = {}
            for rate in RATES:  # the operating points a user may choose with --accept-rate
                t = threshold_for(held, rate)
                points[f"{rate:g}"] = {"known_accepted": round(float((chosen[known] >= t).mean()), 4),
                                       "unknown_rejected": round(float((chosen[~known] < t).mean()), 4)}
            out["val"] = {
                "score": cal.score, "auroc": round(auroc(chosen[known], chosen[~known]), 4),
                "fpr_at_95tpr": round(fpr_at_tpr(chosen[known], chosen[~known]), 4),
                "auroc_msp": round(auroc(msp(lk, T), msp(logits[~known], T)), 4),
                "fpr_at_95tpr_msp": round(fpr_at_tpr(msp(lk, T), msp(logits[~known], T)), 4),
                "accept_rate": round(float((chosen[known] >= thr).mean()), 4),
                "unknown_rejected": round(float((chosen[~known] < thr).mean()), 4),
                "accuracy": round(100 * float(correct.mean()), 2),
                "ece": {n: round(ece(c, correct), 4) for n, c in confs.items()},
                "reliability": {n: reliability(c, correct) for n, c in confs.items()},
                "hist": {"known": chosen[known].tolist(), "unknown": chosen[~known].tolist()},
                "operating_points": points,
            }
    return out


def enrollment_check(engine: str, root: Path, cache: Path) -> dict:
    """Must-show 3: enroll 10 unseen classes, keep 10 more unseen (see the module docstring)."""
    from edgecl.device.enroll import augment_views, view_rows
    from edgecl.device.openset import threshold_for

    split = engine_sets(engine, root, cache)
    rt = split["rt"]
    k = len(split["old"])
    new, unseen = split["order"][k:k + 10], split["order"][k + 10:k + 20]
    feats, y = split["sets"]["val"]

    def rates(thr_frozen=None):
        logits = rt.predict_features(feats)[0]
        s = rt.open_set.scores(logits)
        thr = rt.open_set.threshold() if thr_frozen is None else thr_frozen
        groups = {"known": y < k, "enrolled": (y >= k) & (y < k + 10), "unseen": (y >= k + 10) & (y < k + 20)}
        return {g: round(float((s[m] >= thr).mean()), 4) for g, m in groups.items()} | {"threshold": round(thr, 5)}

    before = rates()
    frozen = rt.open_set.threshold()
    ms = []
    for c in new:
        files = list_images(root / "train" / c)[:SHOTS]
        frames = load_frames(files, rt.size)
        views = {ln: v for ln, v in rt.features(augment_views(frames, VIEWS), batch=64).items() if ":" not in ln}
        rows = {ln: view_rows(rt.heads.heads[ln].inputs(v), len(VIEWS)) for ln, v in views.items()}
        rt.heads.enroll(c, rows)
        t = time.perf_counter()
        rt.open_set.threshold()
        ms.append(1000 * (time.perf_counter() - t))
    after = rates()
    after_frozen = rates(frozen)
    held = rt.open_set.held_out_scores()
    shutil.rmtree(split["probe"], ignore_errors=True)
    return {"engine": engine, "enrolled": new, "unseen": unseen, "before": before, "after": after,
            "after_frozen_threshold": after_frozen, "threshold_update_ms": round(float(np.median(ms)), 1),
            "held_out_accept_after": round(float((held >= after["threshold"]).mean()), 4),
            "check_threshold": round(threshold_for(held, rt.open_set.accept_rate), 5)}


def plot_reliability(per_engine: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_engine), figsize=(4 * len(per_engine), 4), squeeze=False)
    for ax, (label, res) in zip(axes[0], per_engine):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for name, color in (("uncalibrated", "tab:red"), ("temperature", "tab:orange"), ("calibrated", "tab:blue")):
            bins = [b for b in res["val"]["reliability"][name] if b[2] >= 10]
            ax.plot([b[3] for b in bins], [b[4] for b in bins], marker="o", ms=3, color=color,
                    label=f"{name} (ECE {res['val']['ece'][name]:.3f})")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("reported confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Reliability on known val images (15 bins, bins with >= 10 images)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def plot_scores(per_engine: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(per_engine), figsize=(4 * len(per_engine), 3.4), squeeze=False)
    for ax, (label, res) in zip(axes[0], per_engine):
        h = res["val"]["hist"]
        lo, hi = np.percentile(h["known"] + h["unknown"], [0.5, 99.5])
        bins = np.linspace(lo, hi, 40)
        ax.hist(h["known"], bins=bins, density=True, alpha=0.55, label="known classes")
        ax.hist(h["unknown"], bins=bins, density=True, alpha=0.55, label="unknown classes")
        ax.axvline(res["threshold"], color="k", lw=1, label="threshold (95 % of held-out known)")
        ax.set_title(f"{label}: {res['val']['score']} AUROC {res['val']['auroc']:.3f}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engines", nargs="*", default=[], help="engine directories trained on 90 classes")
    ap.add_argument("--data", required=True)
    ap.add_argument("--enroll-engine", help="an engine trained on 70 classes: 10 enrolled, 10 kept unseen")
    ap.add_argument("--cache", default="/tmp/edgecl-open-set-bench")
    ap.add_argument("--out", default="runs/open-set")
    args = ap.parse_args(argv)
    if not args.engines and not args.enroll_engine:
        ap.error("give --engines, --enroll-engine or both")

    root, cache = Path(args.data), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    per_engine, rows = [], []
    for engine in args.engines:
        split = engine_sets(engine, root, cache)
        if split["rt"].open_set is None:
            raise SystemExit(f"{engine} was exported without unknown-rejection calibration; export it again")
        res = measure(split)
        res["threshold"] = split["rt"].open_set.threshold()
        label = f"{split['rt'].manifest.method} {Path(engine).name}"
        per_engine.append((label, res))
        shutil.rmtree(split["probe"], ignore_errors=True)
        print(json.dumps({"engine": engine, "candidates": res["candidates"],
                          **{k: v for k, v in res["val"].items() if k not in ("reliability", "hist")}}), flush=True)

    lines: list = []
    results: dict = {}
    if per_engine:
        names = list(per_engine[0][1]["candidates"])
        mean_select = {s: float(np.mean([r["candidates"][s]["select"] for _, r in per_engine])) for s in names}
        chosen = max(mean_select, key=mean_select.get)
        lines += ["Score selection on held-out training images (AUROC, select = train images 300-349; known: the "
                  "engine's classes, unknown: the others); val beside it, not used:", ""]
        lines += markdown_table(["score"] + [f"{lab} select / val" for lab, _ in per_engine] + ["mean select"],
                                [[s] + [f"{r['candidates'][s]['select']:.4f} / {r['candidates'][s]['val']:.4f}"
                                        for _, r in per_engine] + [f"{mean_select[s]:.4f}"] for s in names])
        lines += ["", f"chosen: **{chosen}**", "", "On val (the engine's classes known, the other 10 unknown):", ""]
        for lab, r in per_engine:
            v = r["val"]
            rows.append([lab, v["score"], f"{v['auroc']:.4f}", f"{v['auroc_msp']:.4f}",
                         f"{v['auroc'] - v['auroc_msp']:+.4f}",
                         f"{v['fpr_at_95tpr']:.3f}", f"{v['fpr_at_95tpr_msp']:.3f}", f"{100 * v['accept_rate']:.1f}",
                         f"{100 * v['unknown_rejected']:.1f}", f"{v['ece']['uncalibrated']:.3f}",
                         f"{v['ece']['temperature']:.3f}", f"{v['ece']['calibrated']:.3f}"])
        lines += markdown_table(["engine", "score", "AUROC", "AUROC msp", "gain", "FPR@95", "FPR@95 msp",
                                 "known accepted %", "unknown rejected %", "ECE uncal.", "ECE T", "ECE T+map"], rows)
        lines += ["", "Operating points (`--accept-rate`; the threshold from each engine's held-out images): share of "
                      "known val images accepted / of unknown ones rejected, %:", ""]
        lines += markdown_table(["engine"] + [f"accept {r:g}" for r in RATES],
                                [[lab] + [f"{100 * r['val']['operating_points'][f'{x:g}']['known_accepted']:.1f} / "
                                          f"{100 * r['val']['operating_points'][f'{x:g}']['unknown_rejected']:.1f}"
                                          for x in RATES] for lab, r in per_engine])
        results.update({"chosen": chosen, "mean_select_auroc": mean_select,
                        "engines": [{"label": lab, **r} for lab, r in per_engine]})
    if args.enroll_engine:
        e = enrollment_check(args.enroll_engine, root, cache)
        results["enrollment"] = e
        lines += ["", f"Enrollment on the device ({e['engine']}: 10 unseen classes enrolled from {SHOTS} train images "
                      f"each, 10 more kept unseen), share of val images accepted:", ""]
        lines += markdown_table(["threshold", "known classes", "enrolled classes", "unseen classes"],
                                [[f"{lab} ({d['threshold']})", f"{100 * d['known']:.1f}", f"{100 * d['enrolled']:.1f}",
                                  f"{100 * d['unseen']:.1f}"]
                                 for lab, d in (("before enrolling", e["before"]), ("after, recomputed", e["after"]),
                                                ("after, frozen at export", e["after_frozen_threshold"]))])
        lines += ["", f"threshold recomputation after an enrollment: {e['threshold_update_ms']} ms (median)"]
    table = "\n".join(lines) + "\n"
    write_results(args.out, table, results, PROG, argv)
    if per_engine:
        out = Path(args.out)
        (out / "reliability.png").write_bytes(plot_reliability(per_engine))
        (out / "scores.png").write_bytes(plot_scores(per_engine))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
