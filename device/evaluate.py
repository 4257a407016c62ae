"""``edgecl eval ENGINE_DIR``: top-1 of an engine directory on an ImageFolder, through the
device runtime (:class:`~edgecl.device.runtime.Runtime`: the backend ``edgecl run`` would
choose, the heads with the store's enrolled, renamed and removed classes, the manifest's
aggregation) -- what the device predicts, minus the camera. Torch-free.

Images are decoded as the trainer decodes them (:func:`edgecl.data.load_imagefolder`: shorter
side to the input size, centre crop, RGB) and handed to the engine in its channel order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgecl.core.errors import EdgeclError


def evaluate_engine_dir(path, data, split: str = "val", per_class: Optional[int] = None,
                        precision: Optional[str] = None, backend: str = "auto", store=None,
                        progress: bool = True, threads: int = 0, batch: int = 64,
                        log: Callable = print) -> dict:
    """``{"accuracy", "n", "classes", "skipped_classes", "store", "store_generation", "backend", ...}``;
    SAFE engines add ``accuracy_<learner>`` for each learner alone."""
    from edgecl.data import load_imagefolder

    from .heads import predict
    from .runtime import Runtime

    rt = Runtime(path, backend, store=store, threads=threads, precision=precision, log=log)
    manifest = rt.manifest
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    if per_class is None:
        per_class = manifest.source_bundle.val_per_class
    images = load_imagefolder(folder, size=rt.size, per_class=per_class, progress=progress)
    classes = rt.classes
    rows, y = images.relabel(classes)
    if len(rows) == 0:
        raise EdgeclError(f"none of the class folders in {folder} is a class of engine directory {path} "
                          f"(it knows {len(classes)} classes, e.g. {', '.join(classes[:3])})")
    bgr = manifest.input.channel_order.upper() == "BGR"
    logits: dict = {}
    for s in range(0, len(rows), batch):
        frames = np.asarray(images.images[rows[s:s + batch]])
        feats = rt.features(np.ascontiguousarray(frames[..., ::-1] if bgr else frames))
        for ln, lg in rt.heads.logits(feats).items():
            logits.setdefault(ln, []).append(lg)
    logits = {ln: np.concatenate(v) for ln, v in logits.items()}
    main = predict(logits, rt.aggregation)
    gens = rt.heads.store.generations()
    result = {"accuracy": round(100.0 * float((main.argmax(1) == y).mean()), 4), "n": int(len(rows)),
              "classes": int(len(set(y.tolist()))),
              "skipped_classes": sorted(set(images.class_names) - set(classes)), "path": str(path),
              "data": str(folder), "store": str(rt.heads.store.path),
              "store_generation": int(rt.heads.state.generation) if gens else 0,
              "backend": rt.backend.name, "model": rt.backend.model}
    if len(logits) > 1:
        result.update({f"accuracy_{ln}": round(100.0 * float((lg.argmax(1) == y).mean()), 4)
                       for ln, lg in logits.items()})
    return result
