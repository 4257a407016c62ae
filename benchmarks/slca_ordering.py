"""The SLCA papers' ordering on the quick protocol, as one table.

    python benchmarks/slca_ordering.py --data ../shared/data/tiny-imagenet-100 --out runs/slca-ordering

Runs `edgecl train --profile quick` (seed 1993 unless --seed) for SimpleCIL, sequential
fine-tuning, SLCA and SLCA++ (each an ordinary bundle under --out), prints a Markdown table
(A_last, A_avg, forgetting, wall time) with the orderings the papers report checked
(seqft far below SimpleCIL, SLCA above SimpleCIL, SLCA++ at least SLCA), and writes it to
OUT/ordering.md with the raw metrics in OUT/ordering.json. Exit status 1 if an ordering fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_protocol import run_quick

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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    lines = ["| method | A_last | A_avg | forgetting | wall time (s) |", "|---|---|---|---|---|"]
    for method, m in results.items():
        lines.append(f"| {method} | {m['A_last']:.2f} | {m['A_avg']:.2f} | {m['forgetting']:.2f} | {m['wall_s']:.0f} |")
    checks = orderings(results)
    lines += [""] + [f"- {text}: {'yes' if ok else 'NO'}" for text, ok in checks]
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ordering.md").write_text(table + "\n")
    (out / "ordering.json").write_text(json.dumps({"seed": args.seed, "sets": args.sets, "results": results,
                                                   "orderings": dict(checks)}, indent=2))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
