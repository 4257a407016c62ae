"""ImageNet-1k top-1/top-5 of the embedded EfficientNet-Lite0 weights on tiny-imagenet-100 val.

Every tiny-imagenet-100 wnid is an ImageNet-1k class, so the embedded 1000-way classifier can
be scored directly. Checks the key mapping, the timm variant and the input normalisation:

    python benchmarks/imagenet_top1.py --variant tf_efficientnet_lite0 --norm half

``--variant all`` / ``--norm all`` run every combination (``--bn-eps`` overrides BatchNorm eps).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgecl.backbones import Normalize, embedded_weights_path, imagenet_synsets, load_timm_model

NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
VARIANTS = ("tf_efficientnet_lite0", "efficientnet_lite0")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-100"


def load_images(data: Path, per_class: int, size: int, max_classes: int | None = None):
    """First ``per_class`` val images per class (sorted by name), resized bicubic -> (uint8 NHWC, labels)."""
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


@torch.no_grad()
def evaluate(variant: str, norm: str, frames: torch.Tensor, labels: torch.Tensor, bn_eps: float | None = None,
             batch: int = 100) -> dict:
    """Top-1 / top-5 (%) of the embedded weights loaded into ``variant`` with normalisation ``norm``."""
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EDGECL_TINY_IMAGENET", DEFAULT_DATA)))
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--max-classes", type=int, default=None)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variant", default="tf_efficientnet_lite0", choices=(*VARIANTS, "all"))
    ap.add_argument("--norm", default="half", choices=(*NORMS, "all"))
    ap.add_argument("--bn-eps", type=float, default=None, help="override BatchNorm eps (default: the variant's)")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = ap.parse_args(argv)

    torch.set_grad_enabled(False)
    frames, labels = load_images(args.data, args.per_class, args.size, args.max_classes)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    norms = tuple(NORMS) if args.norm == "all" else (args.norm,)
    if not args.json:
        print(f"{len(frames)} images, {len(set(labels.tolist()))} classes, {args.size} px, 1000-way")
        print(f"{'variant':<24}{'norm':<10}{'bn_eps':>8}{'top1%':>8}{'top5%':>8}{'sec':>7}")
    for variant, norm in itertools.product(variants, norms):
        r = evaluate(variant, norm, frames, labels, args.bn_eps)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['variant']:<24}{r['norm']:<10}{r['bn_eps']:>8g}{r['top1']:>8.2f}{r['top5']:>8.2f}{r['seconds']:>7}")


if __name__ == "__main__":
    main()
