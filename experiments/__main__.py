"""``python -m experiments``: lists the experiments (run one with ``python -m experiments.NAME``)."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import summaries


def main() -> int:
    names = summaries(Path(__file__).resolve().parent)
    width = max(map(len, names)) + 2
    print("usage: python -m experiments.NAME [options]   (python -m experiments.NAME --help)\n\nexperiments:")
    for name, line in names.items():
        print(f"  {name:<{width}}{line}")
    print("\nWhat each decided or diagnosed, and where docs/ records it: experiments/README.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
