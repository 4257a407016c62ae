"""Selects SLCA's alignment heuristics on held-out training images, and reports every variant's protocol figures.

    python -m experiments.slca_select --data ../shared/data/tiny-imagenet-100 --method slcapp --seed 1993 \\
        --out runs/slca-select/slcapp-s1993

One quick-protocol run of ``--method`` (slca or slcapp, ``--set`` overrides on top: ``--set
pet.lora_init=kaiming ...`` gives the LoRA before issue 17). The classifier alignment trains a
*copy* of the heads and the next session starts from the stage-1 heads (edgecl/learners/slca.py),
so the backbone, the stage-1 heads and the class statistics do not depend on the alignment's
heuristics: after every session each variant (``--variants``: the authors' mean scaling
``mean``, SLCA++'s ``fc_scale_mu`` as ``muX``, joined by ``+``; ``plain`` for neither) is aligned
on the same statistics with the run's seed and scored on the seen classes' **held-out training
images** (the last ``--heldout-per-class`` of each class, never read by the quick protocol:
the variant is chosen on them, by held-out A_last averaged over the runs given to
``--choose``; a heuristic must beat ``plain`` by more than ``--tie`` points) and on the val
images (reported, never used to choose). A variant's val A_last and A_avg are exactly what
``edgecl train`` with that variant's configuration reports; the run's own configuration is one
of the variants (a check: it reproduces the run's predictions).

Writes OUT/slca_select.json and OUT/slca_select.md. ``--choose DIR [DIR ...]``: no training;
reads those runs' JSON files and prints the choice table (``--out`` gets it as choice.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m experiments.slca_select"
VARIANTS = ("plain", "mean", "mu0.02", "mean+mu0.02")


def parse_variant(text: str) -> dict:
    """'plain', 'mean', 'muX' or 'mean+muX' -> {"mean_scale": bool, "fc_scale_mu": float}."""
    out = {"mean_scale": False, "fc_scale_mu": 0.0}
    for part in text.split("+"):
        if part == "mean":
            out["mean_scale"] = True
        elif part.startswith("mu"):
            out["fc_scale_mu"] = float(part[2:])
        elif part != "plain":
            raise SystemExit(f"--variants {text!r}: use plain, mean, muX or mean+muX")
    return out


def choose(dirs: list, out: str | None, tie: float) -> int:
    runs = [json.loads((Path(d) / "slca_select.json").read_text())["results"] for d in dirs]
    names = list(runs[0]["variants"])
    header = ["variant"] + [f"{r['method']} s{r['seed']} held-out A_last" for r in runs] + \
             ["held-out mean"] + [f"{r['method']} s{r['seed']} val A_last / A_avg" for r in runs]
    rows, means = [], {}
    for v in names:
        held = [r["variants"][v]["heldout"]["A_last"] for r in runs]
        means[v] = float(np.mean(held))
        rows.append([v] + [f"{h:.2f}" for h in held] + [f"{means[v]:.2f}"] +
                    [f"{r['variants'][v]['val']['A_last']:.2f} / {r['variants'][v]['val']['A_avg']:.2f}" for r in runs])
    best = max(names, key=lambda v: (round(means[v], 2), -names.index(v)))  # ties: the earlier (simpler) variant
    first = names[0]  # plain: a heuristic is kept only when it beats it by more than --tie
    if best != first and means[best] - means[first] <= tie:
        best = first
    text = "\n".join(markdown_table(header, rows) + [
        "", f"chosen on the held-out images: **{best}** (the best mean held-out A_last; a heuristic must beat "
            f"{first} by more than {tie} point, about twice the alignment draws' spread)"])
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "choice.md").write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", help="tiny-imagenet-100 (ImageFolder with train/ and val/)")
    ap.add_argument("--method", default="slcapp", choices=["slca", "slcapp"])
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--heldout-per-class", type=int, default=50,
                    help="held-out training images per class the variant is chosen on (the last of each class)")
    ap.add_argument("--choose", nargs="+", metavar="DIR", help="print the choice over these runs' results")
    ap.add_argument("--tie", type=float, default=0.2,
                    help="points a heuristic must gain over the first variant (plain) on the held-out images")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/slca-select")
    args = ap.parse_args(argv)
    if args.choose:
        return choose(args.choose, args.out, args.tie)
    if not args.data:
        ap.error("--data is required (unless --choose)")
    variants = {v: parse_variant(v) for v in args.variants}

    import dataclasses

    import torch

    from edgecl.learners.base import to_incremental
    from edgecl.train import build_learner
    from experiments.safe_select import heldout_and_val, quick_setup

    start = time.perf_counter()
    cfg, train_set, val_set, scenario = quick_setup(args.method, args.data, args.seed, args.sets)
    label_map = scenario.label_map(len(train_set.class_names))
    sets = heldout_and_val(cfg, args.data, args.out, args.heldout_per_class, train_set, val_set, scenario)
    learner = build_learner(cfg)
    learner.progress = False
    own = {"mean_scale": cfg.slca.ca_mean_scale, "fc_scale_mu": cfg.slca.fc_scale_mu}
    acc = {v: {name: [] for name in sets} for v in variants}
    own_acc = []
    align_s = {v: 0.0 for v in variants}
    seen = 0
    for t, classes in enumerate(scenario.sessions):
        learner.learn(t, to_incremental(train_set, label_map, classes), list(range(seen, seen + len(classes))))
        seen += len(classes)
        learner.num_seen = seen
        feats, labels = {}, {}
        for name, s in sets.items():
            rows = np.flatnonzero(np.asarray(s.labels) < seen)
            feats[name] = learner.features(learner.model, "model", s, rows).to(learner.device)
            labels[name] = np.asarray(s.labels)[rows]
        with torch.no_grad():
            own_acc.append(100.0 * float((learner.classifier(feats["val"]).argmax(1).cpu().numpy()
                                          == labels["val"]).mean()))
        for v, heur in variants.items():
            t0 = time.perf_counter()
            if t == 0 or learner.aligned is None:
                head = learner.head  # no alignment after the first session
            elif heur == own:
                head = learner.aligned
            else:
                head = learner.align(learner.stats, learner.head, t,
                                     spec=dataclasses.replace(learner.alignment_spec(), **heur))
            align_s[v] += time.perf_counter() - t0
            with torch.no_grad():
                for name in sets:
                    pred = head(feats[name]).argmax(1).cpu().numpy()
                    acc[v][name].append(100.0 * float((pred == labels[name]).mean()))
        print(f"session {t + 1}: " + ", ".join(f"{v} {acc[v]['heldout'][-1]:.2f}/{acc[v]['val'][-1]:.2f}"
                                                for v in variants) + " (held-out/val)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    results = {"method": args.method, "seed": args.seed, "sets": args.sets, "wall_s": round(wall, 1),
               "own": own, "own_val": {"A_last": own_acc[-1], "A_avg": float(np.mean(own_acc))},
               "variants": {v: {name: {"A_last": a[-1], "A_avg": float(np.mean(a)), "per_session": a}
                                for name, a in acc[v].items()} | {"heuristics": variants[v],
                                                                  "align_s": round(align_s[v], 1)}
                            for v in variants}}
    header = ["variant", "held-out A_last", "held-out A_avg", "val A_last", "val A_avg", "alignment time (s)"]
    rows = [[v, f"{r['heldout']['A_last']:.2f}", f"{r['heldout']['A_avg']:.2f}", f"{r['val']['A_last']:.2f}",
             f"{r['val']['A_avg']:.2f}", f"{r['align_s']:.0f}"] for v, r in results["variants"].items()]
    lines = markdown_table(header, rows) + [
        "", f"{args.method} seed {args.seed} ({' '.join(args.sets) or 'configured defaults'}): the run's own "
            f"heads (variant {own}) give val A_last {own_acc[-1]:.2f}, A_avg {np.mean(own_acc):.2f}; {wall:.0f} s"]
    write_results(args.out, "\n".join(lines), results, PROG, argv, md="slca_select.md", json_name="slca_select.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
