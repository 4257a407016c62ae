"""``edgecl eval ENGINE_DIR``: top-1 of an engine directory with ONNX Runtime (CPU) and the
numpy heads of :mod:`edgecl.device.heads` -- the path the device takes, minus the camera."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from edgecl.device.engine_dir import default_precision, model_file, open_engine_dir
from edgecl.device.heads import predict
from edgecl.errors import EdgeclError


def evaluate_engine_dir(path, data, split: str = "val", per_class: Optional[int] = None,
                        precision: Optional[str] = None, progress: bool = True, threads: int = 0) -> dict:
    from edgecl.data import load_imagefolder

    from .parity import ort_features, ort_session, to_channel_order

    eng = open_engine_dir(path)
    manifest, heads, classes = eng["manifest"], eng["heads"], eng["classes"]
    precision = precision or default_precision(manifest)
    onnx_file = model_file(manifest, precision)  # an explicit precision the directory lacks is refused
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    if per_class is None:
        per_class = manifest.get("source_bundle", {}).get("val_per_class")
    images = load_imagefolder(folder, size=manifest["input"]["size"], per_class=per_class, progress=progress)
    rows, y = images.relabel(classes)
    if len(rows) == 0:
        raise EdgeclError(f"none of the class folders in {folder} is a class of engine directory {path} "
                          f"(it knows {len(classes)} classes, e.g. {', '.join(classes[:3])})")
    frames = to_channel_order(np.asarray(images.images)[rows], manifest["input"]["channel_order"])
    feats = ort_features(ort_session(Path(path) / onnx_file, threads), frames)
    logits = {ln: heads[ln].logits(feats[ln]) for ln in heads}
    main = predict(logits, manifest.get("aggregation"))
    result = {"accuracy": round(100.0 * float((main.argmax(1) == y).mean()), 4), "n": int(len(rows)),
              "classes": int(len(set(y.tolist()))),
              "skipped_classes": sorted(set(images.class_names) - set(classes)), "path": str(path),
              "data": str(folder), "precision": precision, "model": onnx_file, "runtime": "onnxruntime-cpu"}
    if len(logits) > 1:
        result.update({f"accuracy_{ln}": round(100.0 * float((lg.argmax(1) == y).mean()), 4) for ln, lg in logits.items()})
    return result
