"""``edgecl eval ENGINE_DIR``: top-1 of an engine directory on an ImageFolder, through the
device runtime (:class:`~edgecl.device.runtime.Runtime`: the backend ``edgecl run`` would
choose, the heads with the store's enrolled, renamed and removed classes, the manifest's
aggregation) -- what the device predicts, minus the camera. Torch-free.

Images are decoded as the trainer decodes them (:func:`edgecl.data.load_imagefolder`: shorter
side to the input size, centre crop, RGB) and handed to the engine in its channel order.

Also reported: ``ece``, the expected calibration error (15 bins) of the confidence the device
reports, on the known images (``ece_uncalibrated``: of the plain softmax), and with
``unknown_data`` (images of classes the engine does not know) an ``open_set`` object: the
rejection ``score``, its ``auroc`` and ``fpr_at_95tpr`` against those unknowns, ``auroc_msp``
(maximum softmax probability at the fitted temperature on the same images), the share of known
images accepted at the operating point (``accept_rate``, against ``target_accept_rate``), the
share of unknown ones rejected, and the accuracy on the known images that were accepted
(docs/DEVICE.md, "Unknown rejection").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgecl.core.errors import EdgeclError


def _logits(rt, images, rows, batch: int) -> dict:
    """{learner: logits} of ``images.images[rows]`` through the runtime."""
    bgr = rt.manifest.input.channel_order.upper() == "BGR"
    logits: dict = {}
    for s in range(0, len(rows), batch):
        frames = np.asarray(images.images[rows[s:s + batch]])
        feats = rt.features(np.ascontiguousarray(frames[..., ::-1] if bgr else frames))
        for ln, lg in rt.heads.logits(feats).items():
            logits.setdefault(ln, []).append(lg)
    return {ln: np.concatenate(v) for ln, v in logits.items()}


def open_set_report(rt, known: np.ndarray, y: np.ndarray, unknown: Optional[np.ndarray]) -> dict:
    """``{"ece", "ece_uncalibrated", "open_set"?}`` of the final logits of known images (labels ``y``)
    and, when given, of unknown images (see the module docstring)."""
    from .openset import auroc, confidence, ece, fpr_at_tpr, msp

    correct = known.argmax(1) == y
    judged = rt.judge(known)
    cal = rt.open_set.calib if rt.open_set is not None else None
    conf = judged["confidence"] if cal is not None else confidence(known)  # what the device reports
    out = {"ece": round(ece(conf, correct), 4), "ece_uncalibrated": round(ece(confidence(known), correct), 4)}
    if unknown is None:
        return out
    T = cal.temperature if cal is not None else 1.0
    s_known = judged["score"] if judged is not None else known.max(1)
    s_unknown = rt.judge(unknown)["score"] if judged is not None else unknown.max(1)
    report = {"score": cal.score if cal is not None else "maxlogit", "calibrated": cal is not None,
              "auroc": round(auroc(s_known, s_unknown), 4), "fpr_at_95tpr": round(fpr_at_tpr(s_known, s_unknown), 4),
              "auroc_msp": round(auroc(msp(known, T), msp(unknown, T)), 4),
              "known": int(len(known)), "unknown": int(len(unknown))}
    if judged is not None:
        accepted = judged["known"]
        report.update({"threshold": round(float(judged["threshold"]), 6),
                       "target_accept_rate": rt.open_set.accept_rate if rt.open_set is not None else None,
                       "accept_rate": round(float(accepted.mean()), 4),
                       "unknown_rejected": round(float((s_unknown < judged["threshold"]).mean()), 4),
                       "accuracy_accepted": round(100.0 * float(correct[accepted].mean()), 4) if accepted.any()
                       else None})
    out["open_set"] = report
    return out


def evaluate_engine_dir(path, data, split: str = "val", per_class: Optional[int] = None,
                        precision: Optional[str] = None, backend: str = "auto", store=None,
                        progress: bool = True, threads: int = 0, batch: int = 64,
                        unknown_data: Optional[str] = None, accept_rate: Optional[float] = None,
                        log: Callable = print) -> dict:
    """``{"accuracy", "n", "classes", "skipped_classes", "store", "store_generation", "backend", "ece",
    ...}``; SAFE engines add ``accuracy_<learner>`` for each learner alone; ``unknown_data`` adds
    ``open_set`` (see the module docstring)."""
    from edgecl.data import load_imagefolder

    from .heads import predict
    from .runtime import Runtime

    rt = Runtime(path, backend, store=store, threads=threads, precision=precision, accept_rate=accept_rate, log=log)
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
    unknown = None
    if unknown_data is not None:
        uroot = Path(unknown_data)
        ufolder = uroot / split if (uroot / split).is_dir() else uroot
        uimages = load_imagefolder(ufolder, size=rt.size, per_class=per_class, progress=progress,
                                   what="--unknown-data")
        known_names = sorted(set(uimages.class_names) & set(classes))
        if known_names:
            raise EdgeclError(f"--unknown-data {ufolder} holds classes the engine knows ({', '.join(known_names[:3])}"
                              f"{', ...' if len(known_names) > 3 else ''}); give images of classes it does not know")
        unknown = predict(_logits(rt, uimages, np.arange(len(uimages.labels)), batch), rt.aggregation)
    logits = _logits(rt, images, rows, batch)
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
    result.update(open_set_report(rt, main, y, unknown))
    return result
