"""``edgecl demo``: the whole job on the embedded default, with nothing to download.

The data is scikit-learn's handwritten digits (1797 8x8 images shipped inside scikit-learn),
written once as an ImageFolder (64x64 RGB PNGs, a seeded 75/25 train/val split per class). Nine
digits are learned in class-incremental sessions of two (the last has one) on the embedded
EfficientNet-Lite0 (configs/demo.yaml); the tenth of the seeded class order is held out. The
bundle is re-loaded and evaluated from disk alone, exported to an engine directory, and the
device runtime (torch-free, edgecl.device) then runs the camera loop headless on a video made
of val images, and enrolls the held-out digit from 20 of its train images, without training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
HELD_OUT_AFTER = 9  # data.num_classes: the last digit of the seeded order is enrolled on the device


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
        n_val = round(val_fraction * len(idx))
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

    out_dir = Path(out).expanduser().resolve()
    start = time.perf_counter()
    data = write_digits_imagefolder(out_dir / "digits")
    log(f"demo data: scikit-learn digits as an ImageFolder in {data}")
    cfg = resolve_config(method, "demo", None, {"data": {"root": str(data), "cache_dir": str(out_dir / "cache"),
                                                         "num_classes": HELD_OUT_AFTER}})
    bundle = out_dir / f"bundle-{method}"
    metrics = train(cfg, str(bundle), progress=progress, log=log)
    check = evaluate(str(bundle), str(data), progress=False)
    log(f"re-loaded {bundle}: accuracy {check['accuracy']:.2f} on {check['n']} val images "
        f"(training run said {metrics['A_last']:.2f})")
    from .device.evaluate import evaluate_engine_dir
    from .export.exporter import export_bundle

    engine_dir = out_dir / f"engine-{method}"
    export_bundle(str(bundle), str(engine_dir), log=log)
    engine_check = evaluate_engine_dir(str(engine_dir), str(data), progress=False, log=lambda m: None)
    log(f"engine directory {engine_dir} ({engine_check['backend']} + numpy heads): accuracy "
        f"{engine_check['accuracy']:.2f} on {engine_check['n']} val images")
    device = run_device_demo(engine_dir, data, out_dir, log=log)
    log(f"demo done in {time.perf_counter() - start:.0f} s. Written under {out_dir}:")
    log(f"  bundle:           {bundle}")
    log(f"  engine directory: {engine_dir}")
    log(f"  device store:     {device['store']}")
    log(f"  data:             {data}")
    return {"metrics": metrics, "eval": check, "bundle": str(bundle), "engine_eval": engine_check,
            "engine_dir": str(engine_dir), "device": device}


def _val_frames(data: Path, folders: list, size: int, per_class: int) -> tuple:
    """(BGR frames, folder index) of the first ``per_class`` val images of each folder."""
    from .device.sources import read_file_frame

    frames, labels = [], []
    for i, name in enumerate(folders):
        files = sorted((data / "val" / name).glob("*.png"))[:per_class]
        frames += [read_file_frame(f, size) for f in files]
        labels += [i] * len(files)
    return np.stack(frames), np.asarray(labels)


def run_device_demo(engine_dir: Path, data: Path, out_dir: Path, shots: int = 20, log: Callable = print) -> dict:
    """The device part: the loop on a generated video, then enrolling the held-out digit."""
    import cv2

    from .device.loop import run_loop
    from .device.runtime import Runtime
    from .device.sources import open_source, read_file_frame

    store = out_dir / "device-store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    rt = Runtime(engine_dir, "auto", store=store, log=log)
    folders = sorted(p.name for p in (data / "val").iterdir() if p.is_dir())
    seen = [f for f in folders if f in rt.classes]
    unseen = [f for f in folders if f not in seen]
    frames, labels = _val_frames(data, seen, rt.size, 10)
    video = out_dir / "demo-val.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (rt.size, rt.size))
    for f in frames:
        writer.write(f)
    writer.release()
    jsonl = out_dir / "demo-run.jsonl"
    with open_source(str(video), log=log) as src:
        summary = run_loop(rt, src, headless=True, jsonl=str(jsonl), log=log)
    import json

    top = [json.loads(line)["top"][0][0] for line in jsonl.read_text().splitlines()]
    truth = np.array(seen)[labels]
    loop_acc = float(100.0 * np.mean([t == y for t, y in zip(top, truth)]))

    def accuracy_on(imgs, names) -> float:
        return float(100.0 * np.mean(np.array(rt.classes)[rt.classify(imgs)["scores"].argmax(1)] == names))

    log(f"edgecl run (headless) on {video.name}: {summary['frames']} frames, top-1 {loop_acc:.1f}%, "
        f"engine {summary['engine_ms_median']:.1f} ms + host {summary['host_ms_median']:.2f} ms per frame; {jsonl}")
    result = {"loop": {**summary, "accuracy": round(loop_acc, 2)}, "store": str(store)}
    for name in unseen:
        folder = name
        train = sorted((data / "train" / folder).glob("*.png"))[:shots]
        shots_frames = np.stack([read_file_frame(f, rt.size) for f in train])
        new_val, _ = _val_frames(data, [folder], rt.size, 1000)
        before = accuracy_on(frames, truth)
        info = rt.enroll_frames(name, shots_frames)
        gen = rt.heads.commit()
        new_acc, old_acc = accuracy_on(new_val, name), accuracy_on(frames, truth)
        log(f"enrolled the unseen digit {name!r} from {len(train)} train images in {info['update_ms']:.0f} ms "
            f"(store generation {gen}): {new_acc:.1f}% of its {len(new_val)} val images recognised; "
            f"the other digits {old_acc:.1f}% (before {before:.1f}%)")
        result["enroll"] = {"name": name, "new_accuracy": round(new_acc, 2), "old_accuracy": round(old_acc, 2),
                            "old_before": round(before, 2), "update_ms": round(info["update_ms"], 1)}
    return result

