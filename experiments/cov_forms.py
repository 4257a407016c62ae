"""Selects the exported covariance form of SLCA's class statistics: A_last against bytes per class.

    python -m experiments.cov_forms --data ../shared/data/tiny-imagenet-100 --out runs/cov-forms

Classifier alignment with each covariance form of the class statistics, on the quick protocol.

One SLCA run (``--method``, quick profile, seed 1993, full covariances) is trained through all
sessions. Because the alignment trains a *copy* of the heads and the next session starts from
the stage-1 heads again (edgecl/learners/slca.py), the backbone, the stage-1 heads and every
class's statistics are the same whatever covariance form the alignment uses: only the final
alignment differs. So for each form the full statistics are converted
(:meth:`edgecl.core.classstats.ClassStats.convert`: exact for diag and shared; lowrank keeps each
class's top-r eigenpairs of its scatter and the rest of its diagonal), the last session's
alignment is re-run with the same seed, and the aligned heads are scored on the val images of
all classes. That A_last is exactly what a full run with that form would report; the "full"
row reproduces the run's own A_last (a check). The form is **chosen on held-out training
images** (the last ``--heldout-per-class`` of each class, which the quick protocol never reads;
:func:`experiments.safe_select.build_heldout`): the smallest form (bytes per class) whose mean
accuracy there is within ``--tolerance`` of full's; val is reported beside, never used to
choose. ``--draws N`` repeats every form's alignment with N independent sampling seeds (the
first is the run's) to show the sampling noise. Prints a
Markdown table and writes OUT/cov_forms.md and OUT/cov_forms.json. The outcome (lowrank r = 64,
the default ``slca.export_cov_form``) is in docs/BENCHMARKS.md, "Covariance forms".
"""

from __future__ import annotations

import sys
import time

import numpy as np

from benchmarks.common import markdown_table, mean_std, parser, write_results

PROG = "python -m experiments.cov_forms"


def parse_form(text: str) -> tuple:
    """'full', 'diag', 'shared' or 'lowrank:R'."""
    name, _, rank = text.partition(":")
    if name == "lowrank":
        return name, int(rank or 16)
    return name, None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--method", default="slca", choices=["slca", "slcapp"])
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--forms", nargs="+", default=["full", "lowrank:64", "lowrank:16", "lowrank:4", "diag", "shared"])
    ap.add_argument("--draws", type=int, default=3,
                    help="repeat each form's alignment with this many independent sampling seeds "
                         "(the first is the run's)")
    ap.add_argument("--heldout-per-class", type=int, default=50,
                    help="held-out training images per class the form is chosen on (the last of each class)")
    ap.add_argument("--tolerance", type=float, default=0.5,
                    help="the largest mean accuracy loss against full (points) a chosen form may have")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/cov-forms")
    args = ap.parse_args(argv)

    import torch

    from edgecl.learners.base import run_sessions
    from edgecl.train import build_learner
    from experiments.safe_select import heldout_and_val, quick_setup

    start = time.perf_counter()
    cfg, train_set, val_set, scenario = quick_setup(args.method, args.data, args.seed, args.sets,
                                                    slca={"cov_form": "full"})
    learner = build_learner(cfg)
    metrics = run_sessions(learner, train_set, val_set, scenario, progress=False)["main"].summary()
    train_s = time.perf_counter() - start
    print(f"{args.method} (full covariances): A_last {metrics['A_last']:.2f} A_avg {metrics['A_avg']:.2f} "
          f"({train_s:.0f} s)", file=sys.stderr, flush=True)

    # held-out training images (the last --heldout-per-class of each class, never read by the quick
    # protocol): the form is chosen on them; val is reported beside, not used to choose
    sets = heldout_and_val(cfg, args.data, args.out, args.heldout_per_class, train_set, val_set, scenario)
    feats = {name: learner.features(learner.model, f"model-{name}", s).to(learner.device) for name, s in sets.items()}
    last = len(scenario.sessions) - 1
    rows = []
    for spec in args.forms:
        form, rank = parse_form(spec)
        stats = learner.stats.convert(form, rank)
        accs = {name: [] for name in sets}
        times = []
        for draw in range(args.draws):
            t0 = time.perf_counter()
            with torch.no_grad():
                aligned = learner.align(stats, learner.head, session=last, draw=draw)
                for name, s in sets.items():
                    pred = aligned(feats[name]).argmax(1).cpu().numpy()
                    accs[name].append(round(100.0 * float((pred == np.asarray(s.labels)).mean()), 2))
            times.append(time.perf_counter() - t0)
        rows.append({"form": spec, "A_last": accs["val"][0], "A_last_draws": accs["val"],
                     "heldout_draws": accs["heldout"], "bytes_per_class": stats.bytes_per_class(),
                     "shared_bytes": stats.shared_bytes(), "align_s": round(times[0], 1)})
        print(f"{spec}: held-out {accs['heldout']}, val {accs['val']}", file=sys.stderr, flush=True)

    full = next((r for r in rows if r["form"] == "full"), None)
    header = ["covariance form", f"held-out: accuracy over {args.draws} draws (mean ± std)",
              "held-out: vs full, same draws (mean)", "val: A_last (first draw)", f"val: over {args.draws} draws",
              "val: vs full, same draws", "bytes per class (float32)", "stored once", "alignment time (s)"]
    table_rows = []
    for r in rows:
        h, v = np.asarray(r["heldout_draws"]), np.asarray(r["A_last_draws"])
        r["heldout_vs_full"] = float((h - np.asarray(full["heldout_draws"])).mean()) if full else None
        r["val_vs_full"] = float((v - np.asarray(full["A_last_draws"])).mean()) if full else None
        once = f"{r['shared_bytes']:,}" if r["shared_bytes"] else "-"
        table_rows.append([r["form"], mean_std(h, bare_single=False),
                           f"{r['heldout_vs_full']:+.2f}" if full else "-", f"{r['A_last']:.2f}",
                           mean_std(v, bare_single=False), f"{r['val_vs_full']:+.2f}" if full else "-",
                           f"{r['bytes_per_class']:,}", once, f"{r['align_s']:.0f}"])
    lines = markdown_table(header, table_rows)
    chosen = None
    if full is not None:  # the smallest form (bytes per class) within --tolerance of full on the held-out images
        ok = [r for r in rows if r["heldout_vs_full"] >= -args.tolerance]
        chosen = min(ok, key=lambda r: (r["bytes_per_class"] + (r["shared_bytes"] or 0) / 500, r["form"]))["form"]
        lines.append(f"\nchosen on the held-out images: **{chosen}** (the smallest within {args.tolerance} point of "
                     f"full, a shared part counted over 500 classes)")
    lines.append(f"\n{args.method} run (full covariances, what `edgecl train` reports): "
                 f"A_last {metrics['A_last']:.2f}, A_avg {metrics['A_avg']:.2f}, {train_s:.0f} s")
    write_results(args.out, "\n".join(lines), {"method": args.method, "seed": args.seed, "run": metrics,
                                               "train_s": round(train_s, 1), "forms": rows, "chosen": chosen},
                  PROG, argv, md="cov_forms.md", json_name="cov_forms.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
