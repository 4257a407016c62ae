r"""SAFE ablation on the quick protocol, mean and spread over seeds, as one table.

    python -m benchmarks safe_ablation --data ../shared/data/tiny-imagenet-100 \
        --seeds 1993 1996 1997 --out runs/safe-ablation

Rows (each A_last / A_avg, mean ± std over the seeds):
  RanPAC                                edgecl train --method ranpac --profile quick
  + slow learner (transfer loss)        SAFE's slow learner alone: RanPAC's first-session PET
                                        trained with the transfer loss as configured (the quick
                                        profile switches it off) and its own RanPAC head
  + fast learner (CE only), aggregate   SAFE with safe.lambda_cc=0, safe.lambda_cos=0: a fast
                                        learner trained with cross-entropy alone, aggregated
  SAFE (entropy aggregate)              full SAFE: + cross-classification + feature alignment
  SAFE: slow alone / fast alone         the two learners of the full SAFE run, each alone
                                        (the aggregate should be at least the better of them)
  variants (--variant)                  extra SAFE runs with config overrides (aggregate, and
                                        fast alone), e.g.
                                        --variant "no cross-classification:safe.lambda_cc=0"
Slow-alone, fast-alone and aggregate come from the same run (metrics.json has all three).
Prints the Markdown table and writes OUT/table.md and OUT/results.json (also written after every
run, so partial results survive an interruption). Finished runs under --out are reused when
their configuration matches (benchmarks.common.run_quick), so seeds can run in separate
processes sharing one --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import markdown_table, mean_std, parser, run_quick, write_json, write_results

PROG = "python -m benchmarks safe_ablation"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1996, 1997])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--skip-ce-only", action="store_true", help="leave out the '+ fast learner (CE only)' runs")
    ap.add_argument("--out", default="runs/safe-ablation")
    args = ap.parse_args(argv)
    out = Path(args.out)

    rows: dict = {}

    def add(name, seed, m):
        rows.setdefault(name, {})[seed] = ({k: m[k] for k in ("A_last", "A_avg")}
                                           | {k: m.get(k) for k in ("wall_s", "learn_s")})
        write_json(out / "results.json", rows, PROG, argv)  # partial results survive an interruption

    for seed in args.seeds:
        m = run_quick("ranpac", seed, args.data, out / f"ranpac-s{seed}", reuse=True)
        add("RanPAC", seed, m)
        m = run_quick("safe", seed, args.data, out / f"safe-s{seed}", reuse=True)
        add("+ slow learner (transfer loss as configured), slow alone", seed, m["slow"] | {"wall_s": None})
        if not args.skip_ce_only:
            mc = run_quick("safe", seed, args.data, out / f"safe-ce-only-s{seed}",
                           ["safe.lambda_cc=0", "safe.lambda_cos=0"], reuse=True)
            add("+ fast learner (CE only), aggregate", seed, mc)
        add("SAFE (entropy aggregate)", seed, m)
        add("SAFE: slow alone", seed, m["slow"] | {"wall_s": None})
        add("SAFE: fast alone", seed, m["fast"] | {"wall_s": None})
        for spec in args.variant:
            name, sets = spec.split(":", 1)
            mv = run_quick("safe", seed, args.data, out / f"safe-{name.replace(' ', '_')}-s{seed}", sets.split(","),
                           reuse=True)
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
                           mean_std([per_seed[s]["A_avg"] for s in seeds]), ", ".join(map(str, seeds)),
                           times("wall_s"), times("learn_s")])
    table = "\n".join(markdown_table(["variant", "A_last", "A_avg", "seeds", "wall time per run (s)",
                                      "of which learning (s)"], table_rows))
    write_results(out, table, rows, PROG, argv)
    return 0
