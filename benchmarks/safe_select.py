"""Choose SAFE's free hyper-parameters on held-out *training* images, never on test images.

    python benchmarks/safe_select.py --data ../shared/data/tiny-imagenet-100 --out runs/safe-select

The quick protocol trains on the first 100 training images of each class (sorted by file
name); tiny-imagenet-100 has 500. This script builds a validation ImageFolder of symlinks to
training images the protocol never reads (the last ``--val-per-class`` of each class) and runs
the quick protocol with those as the evaluation set, once per candidate (``--candidate
NAME:KEY=VALUE[,KEY=VALUE]``; the defaults below). The val/ folder of the data is not read.

Default candidates: the transfer-loss weights of the slow learner (Eq. 2-3), with the fast
learner switched off (``safe.fast_epochs=0``), because the transfer loss only shapes the slow
learner and the slow learner's RanPAC head alone is what it is judged by. Prints slow-alone,
fast-alone and aggregate A_last / A_avg per candidate and writes OUT/select.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quick_protocol import run_quick  # noqa: E402

DEFAULT_CANDIDATES = [
    "no transfer loss:safe.lambda_diag=0,safe.lambda_rdn=0,safe.fast_epochs=0",
    "diag 1 rdn 5:safe.lambda_diag=1,safe.lambda_rdn=5,safe.fast_epochs=0",
    "diag 1 rdn 0.5:safe.lambda_diag=1,safe.lambda_rdn=0.5,safe.fast_epochs=0",
    "diag 0.1 rdn 0.5:safe.lambda_diag=0.1,safe.lambda_rdn=0.5,safe.fast_epochs=0",
]


def build_heldout(train_dir: Path, out: Path, per_class: int, skip: int) -> Path:
    """Symlinks to the last ``per_class`` training images of every class (sorted by name as
    the loader sorts them), all beyond the first ``skip`` the protocol trains on."""
    from edgecl.data import _is_image

    out.mkdir(parents=True, exist_ok=True)
    for cls in sorted(e.name for e in os.scandir(train_dir) if e.is_dir()):
        names = sorted(n for n in os.listdir(train_dir / cls) if _is_image(n))
        if len(names) < skip + per_class:
            raise SystemExit(f"{train_dir / cls}: {len(names)} images, need {skip + per_class} for a held-out split")
        (out / cls).mkdir(exist_ok=True)
        for n in names[-per_class:]:
            link = out / cls / n
            if not link.exists():
                link.symlink_to((train_dir / cls / n).resolve())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (its train/ folder is used)")
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--out", default="runs/safe-select")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train_dir = Path(args.data) / "train"
    heldout = build_heldout(train_dir, out / "heldout", args.val_per_class, skip=100)
    rows = []
    for spec in args.candidate or DEFAULT_CANDIDATES:
        name, sets = spec.split(":", 1)
        sets = sets.split(",") + [f"data.val_root={heldout}"]
        m = run_quick("safe", args.seed, str(train_dir), out / name.replace(" ", "_"), sets)
        rows.append({"name": name, "sets": sets[:-1], **{k: {x: m[k][x] for x in ("A_last", "A_avg")} if k != "aggregate" else
                                                           {x: m[x] for x in ("A_last", "A_avg")}
                                                           for k in ("slow", "fast", "aggregate")}, "wall_s": m["wall_s"]})
        r = rows[-1]
        print(f"{name}: slow {r['slow']['A_last']:.2f} fast {r['fast']['A_last']:.2f} "
              f"aggregate {r['aggregate']['A_last']:.2f} ({m['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    lines = ["| candidate (held-out training images) | slow A_last / A_avg | fast A_last / A_avg | aggregate A_last / A_avg |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]['A_last']:.2f} / {r[k]['A_avg']:.2f}"
                                                       for k in ("slow", "fast", "aggregate")) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "select.md").write_text(table + "\n")
    (out / "select.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
