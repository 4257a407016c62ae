"""``python -m benchmarks SUITE [options]``: runs one suite (``benchmarks/SUITE.py``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks.common import summaries

PROG = "python -m benchmarks"

# The suites, in the order docs/ reports them: one module each (benchmarks/NAME.py, with
# main(argv) -> exit status); the listing's line is the first line of its docstring.
SUITES = (
    "quick_protocol",
    "safe_ablation",
    "slca_ordering",
    "imagenet_top1",
    "channels_last",
    "train_throughput",
    "export",
    "device_video_parity",
    "enroll",
    "enroll_linear",
    "enroll_splits",
    "open_set",
    "serve",
)


def main(argv=None) -> int:
    lines = summaries(Path(__file__).resolve().parent)
    width = max(map(len, SUITES)) + 2
    listing = "suites:\n" + "\n".join(f"  {name:<{width}}{lines.get(name, '')}" for name in SUITES)
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="The benchmark suites that print the figures cited in README.md and docs/. Run from the "
                    "repository root; every suite prints its Markdown table and writes it, with "
                    "results.json, to its --out folder.",
        epilog=listing + f"\n\n'{PROG} SUITE --help' shows a suite's options. Hyper-parameter selections and "
                         "diagnostics: python -m experiments.NAME (experiments/README.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suite", metavar="SUITE", choices=SUITES, help="one of the suites below")
    ap.add_argument("options", nargs=argparse.REMAINDER, help=f"the suite's options ({PROG} SUITE --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        ap.error(f"choose a SUITE ({PROG} --help lists them)")
    args = ap.parse_args(argv)
    return importlib.import_module(f"benchmarks.{args.suite}").main(args.options) or 0


if __name__ == "__main__":
    sys.exit(main())
