"""The parity report every export writes: ONNX Runtime (CPU) against PyTorch.

Reference: the learner's own (unfolded) feature models on ``learner.normalize`` of the RGB
images; candidate: the exported graph on the same images in the graph's channel order.
Reported per learner: max absolute and relative (to the feature scale, max |f|) feature
difference, mean absolute difference, and top-1 agreement of the heads' predictions.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_features(learner, images_rgb: np.ndarray, batch: int = 64) -> dict:
    out = {n: [] for n in learner.feature_models()}
    with torch.no_grad():
        for s in range(0, len(images_rgb), batch):
            x = learner.normalize(torch.from_numpy(np.ascontiguousarray(images_rgb[s:s + batch])))
            for n, m in learner.feature_models().items():
                out[n].append(m.eval()(x).float().numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def ort_session(path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_features(session, frames: np.ndarray, batch: int = 64) -> dict:
    names = [o.name for o in session.get_outputs()]
    inp = session.get_inputs()[0].name
    out = {n: [] for n in names}
    for s in range(0, len(frames), batch):
        res = session.run(names, {inp: np.ascontiguousarray(frames[s:s + batch])})
        for n, r in zip(names, res):
            out[n].append(r)
    return {n[len("features_"):]: np.concatenate(v) for n, v in out.items()}


def to_channel_order(images_rgb: np.ndarray, order: str) -> np.ndarray:
    return np.ascontiguousarray(images_rgb[..., ::-1]) if order.upper() == "BGR" else images_rgb


def compare(ref: dict, got: dict, heads: dict) -> dict:
    report = {}
    for n, a in ref.items():
        b = got[n]
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        scale = float(np.abs(a).max()) or 1.0
        entry = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "feature_scale": scale,
                 "max_rel": float(diff.max() / scale)}
        if n in heads:
            pa, pb = heads[n].logits(a).argmax(1), heads[n].logits(b).argmax(1)
            entry["top1_agreement"] = float((pa == pb).mean())
        report[n] = entry
    return report


def parity_report(learner, onnx_path, images_rgb: np.ndarray, heads: dict, channel_order: str,
                  source: str, precision: str = "fp32") -> dict:
    ref = torch_features(learner, images_rgb)
    got = ort_features(ort_session(onnx_path), to_channel_order(images_rgb, channel_order))
    per = compare(ref, got, heads)
    return {"precision": precision, "runtime": "onnxruntime-cpu", "reference": "pytorch (unfolded learner)",
            "images": int(len(images_rgb)), "source": source, "learners": per,
            "max_abs": max(v["max_abs"] for v in per.values()),
            "max_rel": max(v["max_rel"] for v in per.values()),
            "top1_agreement": min(v.get("top1_agreement", 1.0) for v in per.values())}
