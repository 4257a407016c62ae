r"""The quick protocol (docs/DESIGN.md) for several methods and seeds, as one table.

    python -m benchmarks quick_protocol --data ../shared/data/tiny-imagenet-100 \
        --methods simplecil ranpac --seeds 1993 --repeat 2 --out runs/quick

Each run is an ordinary `edgecl train --profile quick` (bundle under --out). With --repeat 2
every run is done twice and the table says whether the numbers were identical. Prints a
Markdown table (A_last, A_avg, forgetting, wall time) and writes it to OUT/table.md with the
raw figures in OUT/results.json. Exit status 1 if a repeated run gave other numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import markdown_table, parser, run_quick, write_results

PROG = "python -m benchmarks quick_protocol"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (ImageFolder with train/ and val/)")
    ap.add_argument("--methods", nargs="+", default=["simplecil", "ranpac"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993])
    ap.add_argument("--repeat", type=int, default=1, help="run each (method, seed) this many times")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every run (as edgecl train --set)")
    ap.add_argument("--out", default="runs/quick")
    args = ap.parse_args(argv)

    out = Path(args.out)
    results = []
    for method in args.methods:
        for seed in args.seeds:
            runs = []
            for r in range(args.repeat):
                m = run_quick(method, seed, args.data, out / f"{method}-s{seed}-r{r}", args.sets)
                runs.append(m)
                print(f"{method} seed {seed} run {r + 1}: A_last {m['A_last']:.2f} A_avg {m['A_avg']:.2f} "
                      f"({m['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            same = all(x["accuracy"] == runs[0]["accuracy"] for x in runs)
            results.append({"method": method, "seed": seed, "runs": runs,
                            "reproducible": same if args.repeat > 1 else None})

    rows = []
    for r in results:
        m = r["runs"][0]
        rep = {None: "-", True: f"yes ({len(r['runs'])} runs)", False: "NO"}[r["reproducible"]]
        times = "/".join(f"{x['wall_s']:.0f}" for x in r["runs"])
        rows.append([r["method"], r["seed"], f"{m['A_last']:.2f}", f"{m['A_avg']:.2f}", f"{m['forgetting']:.2f}",
                     times, rep])
    table = "\n".join(markdown_table(["method", "seed", "A_last", "A_avg", "forgetting", "wall time (s)",
                                      "same numbers on repeat"], rows))
    write_results(out, table, results, PROG, argv)
    return 0 if all(r["reproducible"] in (None, True) for r in results) else 1
