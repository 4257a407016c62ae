"""``edgecl demo``: the whole job on the embedded default, with nothing to download.

The data is scikit-learn's handwritten digits (1797 8x8 images shipped inside scikit-learn),
written once as an ImageFolder (64x64 RGB PNGs, a seeded 75/25 train/val split per class), and
learned in five class-incremental sessions of two digits each on the embedded EfficientNet-Lite0
(configs/demo.yaml). The bundle is then re-loaded and evaluated from disk alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits_imagefolder(root: Path, size: int = 64, val_fraction: float = 0.25, seed: int = 0) -> Path:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<n>.png`` (skipped if already there)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    rng = np.random.RandomState(seed)
    for c, name in enumerate(DIGIT_NAMES):
        idx = np.where(digits.target == c)[0]
        rng.shuffle(idx)
        n_val = int(round(val_fraction * len(idx)))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = root / split / f"{c}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                img = (255 - digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # dark ink on white
                Image.fromarray(img).resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    done.write_text("ok\n")
    return root


def run_demo(out: str, method: str = "ranpac", progress: bool = True, log: Callable = print) -> dict:
    from .config import resolve_config
    from .train import evaluate, train

    out_dir = Path(out)
    start = time.perf_counter()
    data = write_digits_imagefolder(out_dir / "digits")
    log(f"demo data: scikit-learn digits as an ImageFolder in {data}")
    cfg = resolve_config(method, "demo", None, {"data": {"root": str(data), "cache_dir": str(out_dir / "cache")}})
    bundle = out_dir / f"bundle-{method}"
    metrics = train(cfg, str(bundle), progress=progress, log=log)
    check = evaluate(str(bundle), str(data), progress=False)
    log(f"re-loaded {bundle}: accuracy {check['accuracy']:.2f} on {check['n']} val images "
        f"(training run said {metrics['A_last']:.2f})")
    from .export.evaluate import evaluate_engine_dir
    from .export.exporter import export_bundle

    engine_dir = out_dir / f"engine-{method}"
    export_bundle(str(bundle), str(engine_dir), log=log)
    engine_check = evaluate_engine_dir(str(engine_dir), str(data), progress=False)
    log(f"engine directory {engine_dir} (ONNX Runtime + numpy heads): accuracy {engine_check['accuracy']:.2f} "
        f"on {engine_check['n']} val images")
    log(f"demo done in {time.perf_counter() - start:.0f} s; bundle: {bundle}; engine directory: {engine_dir}")
    return {"metrics": metrics, "eval": check, "bundle": str(bundle), "engine_eval": engine_check,
            "engine_dir": str(engine_dir)}

