"""The SLCA papers' ordering on the quick protocol, as one table.

    python -m benchmarks slca_ordering --data ../shared/data/tiny-imagenet-100 --out runs/slca-ordering

Runs `edgecl train --profile quick` (seed 1993 unless --seed) for SimpleCIL, sequential
fine-tuning, SLCA and SLCA++ (each an ordinary bundle under --out), prints a Markdown table
(A_last, A_avg, forgetting, wall time) with the orderings the papers report checked
(seqft far below SimpleCIL, SLCA above SimpleCIL, SLCA++ at least SLCA), and writes it to
OUT/table.md with the raw metrics in OUT/results.json. Exit status 1 if an ordering fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import markdown_table, parser, run_quick, write_results

PROG = "python -m benchmarks slca_ordering"
METHODS = ("simplecil", "seqft", "slca", "slcapp")


def orderings(results: dict) -> list:
    """(statement, holds) for each ordering of the papers that the results allow checking."""
    a = {m: r["A_last"] for m, r in results.items()}
    checks = []
    if {"seqft", "simplecil"} <= set(a):
        checks.append(("seqft far below SimpleCIL (A_last, by >= 10 points)", a["seqft"] <= a["simplecil"] - 10))
    if {"slca", "simplecil"} <= set(a):
        checks.append(("SLCA above SimpleCIL (A_last)", a["slca"] > a["simplecil"]))
    if {"slcapp", "slca"} <= set(a):
        checks.append(("SLCA++ at least as good as SLCA (A_last)", a["slcapp"] >= a["slca"]))
    return checks


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (ImageFolder with train/ and val/)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run (as edgecl train --set)")
    ap.add_argument("--out", default="runs/slca-ordering")
    args = ap.parse_args(argv)

    out = Path(args.out)
    results = {}
    for method in args.methods:
        m = run_quick(method, args.seed, args.data, out / f"{method}-s{args.seed}", args.sets)
        results[method] = m
        print(f"{method}: A_last {m['A_last']:.2f} A_avg {m['A_avg']:.2f} ({m['wall_s']:.0f} s)",
              file=sys.stderr, flush=True)

    rows = [[method, f"{m['A_last']:.2f}", f"{m['A_avg']:.2f}", f"{m['forgetting']:.2f}", f"{m['wall_s']:.0f}"]
            for method, m in results.items()]
    lines = markdown_table(["method", "A_last", "A_avg", "forgetting", "wall time (s)"], rows)
    checks = orderings(results)
    lines += [""] + [f"- {text}: {'yes' if ok else 'NO'}" for text, ok in checks]
    table = "\n".join(lines)
    write_results(out, table, {"seed": args.seed, "sets": args.sets, "results": results, "orderings": dict(checks)},
                  PROG, argv)
    return 0 if all(ok for _, ok in checks) else 1
