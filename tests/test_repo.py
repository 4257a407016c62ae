"""Repository hygiene: every document the code and docs cite exists in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC_NAME = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[A-Z][A-Z0-9_]*\.md)\b")  # README.md, docs/DESIGN.md, ...


def repo_text_files() -> list:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        out = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [REPO / f for f in out if Path(f).suffix in {".py", ".md", ".yaml", ".toml", ".txt", ""}
            and (REPO / f).is_file()]


def test_every_cited_document_exists():
    """A cited ``NAME.md`` resolves from the citing file's folder or from the repository root
    (so ``DESIGN.md`` is fine inside docs/, and code says ``docs/DESIGN.md``)."""
    missing = []
    for f in repo_text_files():
        if f == Path(__file__).resolve():
            continue
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for name in set(DOC_NAME.findall(text)):
            if not ((f.parent / name).is_file() or (REPO / name).is_file()):
                missing.append(f"{f.relative_to(REPO)} cites {name}")
    assert not missing, missing
    assert (REPO / "docs" / "DESIGN.md").is_file()


def test_head_kinds_are_compared_only_inside_the_head_registry():
    """A head kind is declared once (edgecl.device.heads); no other code branches on its name."""
    from edgecl.device.heads import HEADS

    names = "|".join(sorted(HEADS))
    compare = re.compile(rf"""(==|!=|\bin\s*[(\[{{])\s*[^#\n]*["']({names})["']|["']({names})["']\s*(==|!=|in\b)""")
    found = []
    for f in repo_text_files():
        parts = f.relative_to(REPO).parts
        if f.suffix != ".py" or parts[0] == "tests" or parts[:2] == ("device", "heads"):
            continue  # the tests may assert on kinds; the registry is where they are declared
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if compare.search(line):
                found.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, found
