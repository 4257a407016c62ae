r"""How far SAFE's fast learner drifts from the slow one, per session, on held-out training images.

    python -m experiments.safe_drift --data ../shared/data/tiny-imagenet-100 --seed 1997 \
        --sessions 3 --variant "lambda_cos 50:" --variant "lambda_cos 5:safe.lambda_cos=5"

The quick protocol's first ``--sessions`` sessions, evaluated on the held-out training images of
``experiments/safe_select.py`` (the last 50 of each class; val/ is never read). Session 1 (the
slow learner) is trained once; every ``--variant NAME:KEY=VALUE[,...]`` (config overrides as
``edgecl train --set``; an empty list is the configuration as it is) continues from a copy of it, so a
variant may change what happens after session 1 (``safe.lambda_cos``, ``safe.fast_lr``,
``safe.lambda_cc``, ``safe.fast_epochs``) and nothing before. After each
session it prints, on the classes seen so far:

- slow, fast, aggregate: A_t of the slow learner, the fast learner and their entropy aggregate;
- fast / slow on session-1 classes: the same, on the first session's classes only (forgetting);
- cos: the mean cosine between fast and slow features of the same image (1 = no drift);
- norm: mean feature norm of the fast learner over the slow learner's;
- fast, head refit: the fast learner with its RanPAC head recomputed from the *current* fast
  features of all seen training images. An exemplar-free learner cannot do this (it keeps no
  old images); the gap to "fast" is what stale G_f / Q_f statistics cost;
- fast, as accumulated: the fast head never refreshed (``safe.keep_stale``, on in this script),
  beside "fast", whose statistics are refreshed when ``safe.refresh_fast`` is on (the default);
- G_f error refreshed / as accumulated: ||G_f - G_refit|| / ||G_refit|| (Frobenius) of the
  refreshed and the never-refreshed head against the refit head's statistics.

Writes OUT/drift.md and OUT/drift.json. The diagnosis (lambda_cos 50 overshoots at the fast
learner's step; the quick profile uses 15) is in docs/METHODS.md (SAFE, lambda_cos).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results
from experiments.safe_select import build_heldout

PROG = "python -m experiments.safe_drift"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (its train/ folder is used)")
    ap.add_argument("--seed", type=int, default=1997)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--out", default="runs/safe-drift")
    args = ap.parse_args(argv)

    import torch.nn.functional as F

    from edgecl.config import parse_set, resolve_config
    from edgecl.data import build_scenario, load_dataset
    from edgecl.heads import RanPACHead
    from edgecl.learners.base import to_incremental, torch_labels
    from edgecl.learners.ranpac import session_holdout
    from edgecl.train import build_learner, seed_everything

    out = Path(args.out)
    train_dir = Path(args.data) / "train"
    heldout = build_heldout(train_dir, out / "heldout", 50, skip=100)

    def config(sets):
        overrides = parse_set([s for s in sets if s])
        overrides.setdefault("data", {}).update(root=str(train_dir), val_root=str(heldout))
        overrides["seed"] = args.seed
        overrides.setdefault("safe", {})["keep_stale"] = True
        return resolve_config("safe", "quick", None, overrides)

    cfg = config([])
    seed_everything(cfg.seed)
    train_set, val_set = load_dataset(cfg.data, progress=False)
    scenario = build_scenario(len(train_set.class_names), cfg.data.split, cfg.seed, cfg.data.num_classes)
    label_map = scenario.label_map(len(train_set.class_names))
    val = to_incremental(val_set, label_map)
    first = len(scenario.sessions[0])

    def session_train(t):
        return to_incremental(train_set, label_map, scenario.sessions[t])

    def offset(t):
        return sum(len(s) for s in scenario.sessions[:t])

    def measure(L, t) -> dict:
        seen = offset(t + 1)
        rows = np.where(val.labels < seen)[0]
        y = val.labels[rows]
        logits = L.predict(val, rows)
        f_s, f_f = L.features(L.slow_model, "slow", val, rows), L.features(L.fast, "fast", val, rows)
        old = y < first

        def acc(lg, mask=slice(None)):
            return round(100.0 * float((np.asarray(lg).argmax(1)[mask] == y[mask]).mean()), 2)

        r = {k: acc(logits[k]) for k in ("slow", "fast", "aggregate")}
        r |= {"fast_first": acc(logits["fast"], old), "slow_first": acc(logits["slow"], old),
              "cos": round(float(F.cosine_similarity(f_f, f_s).mean()), 4),
              "norm": round(float(f_f.norm(dim=1).mean() / f_s.norm(dim=1).mean()), 3)}
        refit = RanPACHead(f_f.shape[1], L.cfg.ranpac.M, L.cfg.seed + 1, L.cfg.ranpac.lambdas)
        for j in range(t + 1):
            tr = session_train(j)
            refit.add(L._extract(L.fast, tr), torch_labels(tr), session_holdout(L.cfg, j, tr))
        refit.solve()
        r["fast_refit"] = acc(refit.logits(f_f).numpy())
        r["fast_stale"] = acc(logits["fast_stale"])
        r["G_err"], r["G_err_stale"] = (round(float((h.G - refit.G).norm() / refit.G.norm()), 4)
                                        for h in (L.fast_head, L.fast_head_stale))
        return r

    base = build_learner(cfg)
    base.progress = False
    start = time.perf_counter()
    base.learn(0, session_train(0), list(range(first)))
    base.num_seen = first
    print(f"session 1 (slow learner): {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    results = [{"variant": "-", "session": 1, **measure(base, 0)}]
    for spec in args.variant or ["as configured:"]:
        name, sets = spec.split(":", 1)
        learner = copy.deepcopy(base)
        learner.cfg = config(sets.split(","))
        for t in range(1, args.sessions):
            learner.learn(t, session_train(t), list(range(offset(t), offset(t + 1))))
            learner.num_seen = offset(t + 1)
            results.append({"variant": name, "session": t + 1, **measure(learner, t)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)

    rows = [[r["variant"], r["session"], f"{r['slow']:.2f}", f"{r['fast']:.2f}", f"{r['aggregate']:.2f}",
             f"{r['fast_first']:.2f} / {r['slow_first']:.2f}", f"{r['cos']:.4f}", f"{r['norm']:.3f}",
             f"{r['fast_refit']:.2f}", f"{r['fast_stale']:.2f}", f"{r['G_err']:.4f} / {r['G_err_stale']:.4f}"]
            for r in results]
    lines = markdown_table([f"variant (seed {args.seed}, held-out)", "session", "slow", "fast", "aggregate",
                            "fast / slow on session-1 classes", "cos(fast, slow)", "norm fast / slow",
                            "fast, head refit", "fast, as accumulated", "G_f error refreshed / as accumulated"],
                           rows)
    write_results(out, "\n".join(lines), results, PROG, argv, md="drift.md", json_name="drift.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
