#!/usr/bin/env python3
"""Print the README command marked ``<!-- ci: NAME -->`` (the first command line after the
marker, without its Markdown indentation), so that .ci/run runs exactly what the README says."""

import sys
from pathlib import Path


def readme_command(name: str, readme: Path) -> str:
    lines = readme.read_text().splitlines()
    marker = f"<!-- ci: {name} -->"
    for i, line in enumerate(lines):
        if line.strip() == marker:
            for nxt in lines[i + 1:]:
                if nxt.strip():
                    return nxt.strip()
    raise SystemExit(f"{readme}: no command marked {marker}")


if __name__ == "__main__":
    print(readme_command(sys.argv[1], Path(__file__).resolve().parents[1] / "README.md"))
