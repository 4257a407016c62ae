"""ImageNet-1k top-1/top-5 of the embedded EfficientNet-Lite0 weights on tiny-imagenet-100 val.

Every tiny-imagenet-100 wnid is an ImageNet-1k class, so the embedded 1000-way classifier can
be scored directly. Checks the key mapping, the timm variant and the input normalisation:

    python -m benchmarks imagenet_top1 --variant tf_efficientnet_lite0 --norm half

``--variant all`` / ``--norm all`` run every combination (``--bn-eps`` overrides BatchNorm eps).
Prints a Markdown table (``--json``: JSON lines instead) and writes it to OUT/table.md with the
figures in OUT/results.json.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_json

PROG = "python -m benchmarks imagenet_top1"
NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
VARIANTS = ("tf_efficientnet_lite0", "efficientnet_lite0")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-100"


def load_images(data: Path, per_class: int, size: int, max_classes: int | None = None):
    """First ``per_class`` val images per class (sorted by name), resized bicubic -> (uint8 NHWC, labels)."""
    import torch
    from PIL import Image

    from edgecl.backbones import imagenet_synsets

    synsets = {w: i for i, w in enumerate(imagenet_synsets())}
    val = data / "val"
    if not val.is_dir():
        raise SystemExit(f"no val/ folder under {data} (--data)")
    wnids = sorted(d.name for d in val.iterdir() if d.is_dir())[:max_classes]
    frames, labels = [], []
    for wnid in wnids:
        if wnid not in synsets:
            continue
        for f in sorted(p for p in (val / wnid).iterdir() if p.is_file())[:per_class]:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
            frames.append(np.asarray(img))
            labels.append(synsets[wnid])
    return torch.from_numpy(np.stack(frames)), torch.tensor(labels)


def evaluate(variant: str, norm: str, frames, labels, bn_eps: float | None = None, batch: int = 100) -> dict:
    """Top-1 / top-5 (%) of the embedded weights loaded into ``variant`` with normalisation ``norm``."""
    import torch

    from edgecl.backbones import Normalize, embedded_weights_path, load_timm_model

    with torch.no_grad():
        model = load_timm_model(variant, weights=embedded_weights_path("tf_efficientnet_lite0"))
        if bn_eps is not None:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eps = bn_eps
        normalize = Normalize(*NORMS[norm])
        eps = next(m.eps for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        top1 = top5 = 0
        t0 = time.time()
        for i in range(0, len(frames), batch):
            logits = model(normalize(frames[i:i + batch]))
            pred = logits.topk(5, dim=1).indices
            y = labels[i:i + batch]
            top1 += (pred[:, 0] == y).sum().item()
            top5 += (pred == y[:, None]).any(dim=1).sum().item()
    n = len(frames)
    return {"variant": variant, "norm": norm, "bn_eps": eps, "n": n, "top1": round(100 * top1 / n, 2),
            "top5": round(100 * top5 / n, 2), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGECL_TINY_IMAGENET", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--max-classes", type=int, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variant", default="tf_efficientnet_lite0", choices=(*VARIANTS, "all"))
    ap.add_argument("--norm", default="half", choices=(*NORMS, "all"))
    ap.add_argument("--bn-eps", type=float, default=None, help="override BatchNorm eps (default: the variant's)")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    ap.add_argument("--out", default="runs/imagenet-top1", help="Folder for table.md and results.json.")
    args = ap.parse_args(argv)

    import torch

    torch.set_grad_enabled(False)
    frames, labels = load_images(args.data, args.per_class, args.size, args.max_classes)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    norms = tuple(NORMS) if args.norm == "all" else (args.norm,)
    caption = f"{len(frames)} images, {len(set(labels.tolist()))} classes, {args.size} px, 1000-way"
    if not args.json:
        print(caption)
    results = []
    for variant, norm in itertools.product(variants, norms):
        r = evaluate(variant, norm, frames, labels, args.bn_eps)
        results.append(r)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['variant']}, {r['norm']}: top-1 {r['top1']:.2f} %, top-5 {r['top5']:.2f} % ({r['seconds']} s)",
                  file=sys.stderr, flush=True)
    rows = [[r["variant"], r["norm"], f"{r['bn_eps']:g}", f"{r['top1']:.2f}", f"{r['top5']:.2f}", r["seconds"]]
            for r in results]
    table = "\n".join(markdown_table(["variant", "norm", "bn_eps", "top-1 %", "top-5 %", "seconds"], rows))
    if not args.json:
        print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"{caption}\n\n{table}\n")
    write_json(out / "results.json", {"caption": caption, "rows": results}, PROG, argv)
    return 0
