"""The quick protocol (docs/DESIGN.md) for several methods and seeds, as one table.

    python benchmarks/quick_protocol.py --data ../shared/data/tiny-imagenet-100 \
        --methods simplecil ranpac --seeds 1993 --repeat 2 --out runs/quick

Each run is an ordinary `edgecl train --profile quick` (bundle under --out). With --repeat 2
every run is done twice and the table says whether the numbers were identical. Prints a
Markdown table (A_last, A_avg, forgetting, wall time) and writes it to OUT/table.md with the
raw figures in OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# settings that do not change what a run learns
_NOT_RECIPE = {"data": ("cache_dir", "workers"), "train": ("device", "threads")}


def _recipe(config: dict) -> dict:
    d = json.loads(json.dumps(config))
    for section, keys in _NOT_RECIPE.items():
        for k in keys:
            d[section].pop(k, None)
    for k in ("root", "val_root"):
        if d["data"].get(k):
            d["data"][k] = os.path.realpath(d["data"][k])
    return d


def run_quick(method: str, seed: int, data: str, out: Path, sets=(), reuse: bool = False) -> dict:
    """One `edgecl train --profile quick` run; returns its metrics (plus wall_s).

    With ``reuse``, a finished run already in ``out`` is read back instead (so an interrupted
    benchmark resumes, and seeds can run in separate processes sharing one --out), provided it
    was trained with the same configuration; a different one stops with a message. A run
    made by older code is not detected: delete --out after changing the code.
    """
    from edgecl.config import parse_set, resolve_config
    from edgecl.train import train

    overrides = parse_set(sets)
    overrides.setdefault("data", {})["root"] = data
    overrides["seed"] = seed
    cfg = resolve_config(method, "quick", None, overrides)
    out = Path(out)
    if reuse and (out / "metrics.json").is_file():
        manifest = json.loads((out / "manifest.json").read_text())
        done, want = _recipe(manifest["config"]), _recipe(cfg.to_dict())
        if any(done[k] != want[k] for k in done.keys() & want.keys()):  # bundles keep their method's sections
            raise SystemExit(f"{out}: holds a finished run with another configuration than "
                             f"{method} {' '.join(sets)}; delete it or choose another --out")
        m = json.loads((out / "metrics.json").read_text())
        return m | {"wall_s": m.get("time_s")}
    start = time.perf_counter()
    m = train(cfg, str(out), progress=False, log=lambda *_: None)
    m["wall_s"] = round(time.perf_counter() - start, 1)
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    lines = ["| method | seed | A_last | A_avg | forgetting | wall time (s) | same numbers on repeat |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["runs"][0]
        rep = {None: "-", True: f"yes ({len(r['runs'])} runs)", False: "NO"}[r["reproducible"]]
        times = "/".join(f"{x['wall_s']:.0f}" for x in r["runs"])
        lines.append(f"| {r['method']} | {r['seed']} | {m['A_last']:.2f} | {m['A_avg']:.2f} | {m['forgetting']:.2f} | "
                     f"{times} | {rep} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0 if all(r["reproducible"] in (None, True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
