r"""SAFE ablation on the quick protocol, mean and spread over seeds, as one table (issue 16).

    python -m benchmarks safe_ablation --data ../shared/data/tiny-imagenet-100 \
        --seeds 1993 1996 1997 --out runs/safe-ablation

Rows (each A_last / A_avg, mean ± std over the seeds):
  RanPAC                                  edgecl train --method ranpac --profile quick
  + slow learner (transfer loss)          SAFE's slow learner alone: RanPAC's first-session PET
                                          trained with the transfer loss and its own RanPAC head
  + fast learner: six forms               the entropy aggregate of slow and fast (Eq. 8-9) with the
                                          fast head's statistics as accumulated (the paper) or
                                          corrected for the fast learner's drift after every
                                          session (safe.refresh_fast), on raw logits (the paper),
                                          each over its fitted temperature or scaled by its cosine
                                          head's sigma (the authors' code; safe.temperature);
                                          the form configs/safe.yaml ships is marked "= SAFE"
                                          (chosen on held-out training images:
                                          python -m experiments.safe_select --aggregation)
  SAFE: slow / fast alone, fast stale     the learners of that run alone (the aggregate should
                                          beat the better of them)
  variants (--variant)                    extra SAFE runs with config overrides, e.g.
                                          --variant "no cross-classification:safe.lambda_cc=0"
Every SAFE row comes from one run per seed (refresh and temperatures on, ``safe.keep_stale=true``
keeping the never-refreshed fast head beside the refreshed one; metrics.json has every
predictor). Also prints the mean aggregation weight of the slow learner per session (metrics.json ``per_session``).
Writes OUT/table.md and OUT/results.json (also after every run, so partial results survive an
interruption). Finished runs under --out are reused when their configuration matches
(benchmarks.common.run_quick), so seeds can run in separate processes sharing one --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import markdown_table, mean_std, parser, predictor_metrics, run_quick, write_json, write_results

PROG = "python -m benchmarks safe_ablation"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1996, 1997])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every run (e.g. train.threads=1)")
    ap.add_argument("--out", default="runs/safe-ablation")
    args = ap.parse_args(argv)
    out = Path(args.out)

    rows: dict = {}
    weights: list = []

    def add(name, seed, m):
        rows.setdefault(name, {})[seed] = ({k: m[k] for k in ("A_last", "A_avg")}
                                           | {k: m.get(k) for k in ("wall_s", "learn_s")})
        write_json(out / "results.json", rows, PROG, argv)  # partial results survive an interruption

    sets = args.set
    from edgecl.config import resolve_config
    from edgecl.learners.safe import AGGREGATION_FORMS, ALL_FORMS

    sc = resolve_config("safe", "quick").safe  # the aggregation form SAFE ships (marked "= SAFE")
    shipped = {"refresh_fast": sc.refresh_fast, "temperature": sc.temperature}
    for seed in args.seeds:
        m = run_quick("ranpac", seed, args.data, out / f"ranpac-s{seed}", sets, reuse=True)
        add("RanPAC", seed, m)
        run = out / f"safe-s{seed}"
        m = run_quick("safe", seed, args.data, run, [*ALL_FORMS, *sets], reuse=True)
        add("+ slow learner (transfer loss), slow alone", seed, m["slow"] | {"wall_s": None})
        for key, (name, options) in AGGREGATION_FORMS.items():  # the run's times on the shipped form's row
            label = f"+ fast learner: {name}" + (" (= SAFE)" if options == shipped else "")
            times = {"wall_s": m["wall_s"], "learn_s": m["learn_s"]} if options == shipped else {"wall_s": None}
            add(label, seed, predictor_metrics(m, key, run) | times)
        add("SAFE: fast alone, refreshed statistics", seed, m["fast"] | {"wall_s": None})
        add("SAFE: fast alone, statistics as accumulated", seed, m["fast_stale"] | {"wall_s": None})
        weights.append([seed] + [f"{r['w_slow']:.3f}" for r in m.get("per_session", [])])
        for spec in args.variant:
            name, vsets = spec.split(":", 1)
            mv = run_quick("safe", seed, args.data, out / f"safe-{name.replace(' ', '_')}-s{seed}",
                           [*vsets.split(","), *sets], reuse=True)
            add(f"SAFE, {name}", seed, mv)
            add(f"SAFE, {name}: fast alone", seed, mv["fast"] | {"wall_s": None})
        print(f"seed {seed} done", file=sys.stderr, flush=True)

    table_rows = []
    for name, per_seed in rows.items():
        seeds = sorted(per_seed)

        def times(key, per_seed=per_seed, seeds=seeds):
            t = [per_seed[s].get(key) for s in seeds]
            return "/".join("-" if v is None else f"{v:.0f}" for v in t) if any(v is not None for v in t) else "-"
        table_rows.append([name, mean_std([per_seed[s]["A_last"] for s in seeds]),
                           mean_std([per_seed[s]["A_avg"] for s in seeds]),
                           " / ".join(f"{per_seed[s]['A_last']:.2f}" for s in seeds),
                           times("wall_s"), times("learn_s")])
    table = "\n".join(markdown_table(["variant", "A_last", "A_avg", f"A_last per seed ({' / '.join(map(str, seeds))})",
                                      "wall time per run (s)", "of which learning (s)"], table_rows))
    if weights:
        n = max(len(w) for w in weights) - 1
        table += ("\n\nMean aggregation weight of the slow learner on the test images after each session "
                  "(the run's own aggregate: refreshed statistics, calibrated):\n\n")
        table += "\n".join(markdown_table(["seed", *(f"s{i + 1}" for i in range(n))], weights))
    write_results(out, table, rows, PROG, argv)
    return 0
