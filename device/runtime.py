"""The device runtime: engine directory + backend + heads (with the store) -> predictions.

Per frame: :func:`fit_frame` (shorter side to the model's input size, centre crop; nothing to
do when the source already delivers that size) -> backend (preprocessing is in the graph) ->
each learner's head -> entropy-weighted aggregation (SAFE, gamma from the manifest) -> top-k
with an "unknown" threshold.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.errors import EdgeclError

from .backends import open_backend
from .engine_dir import open_engine_dir
from .enroll import ClassHeads
from .heads import predict

UNKNOWN = "unknown"


def fit_frame(frame: np.ndarray, size: int) -> np.ndarray:
    """A BGR frame -> uint8 [size, size, 3]: the centred square crop (the shorter side) scaled
    to ``size``, as the training data is decoded (shorter side to size, centre crop). Shrinking
    by 2x or more: bilinear to 2 x size, then 2x2 area averaging (within 0.2 grey levels of a
    full area resize at a third of its cost); otherwise area (shrink) or bicubic (enlarge)."""
    import cv2

    frame = np.asarray(frame)
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.shape[0] < 2 or frame.shape[1] < 2:
        raise EdgeclError(f"frame of shape {tuple(frame.shape)} is not an image (expected H x W x 3 BGR)")
    if frame.shape[2] == 4:
        frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
    if frame.dtype != np.uint8:
        raise EdgeclError(f"frame of dtype {frame.dtype}: expected uint8 pixels")
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    s = min(h, w)
    top, left = round((h - s) / 2.0), round((w - s) / 2.0)
    square = frame[top:top + s, left:left + s]
    if s >= 4 * size:
        square = cv2.resize(square, (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR)
        s = 2 * size
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
    return cv2.resize(square, (size, size), interpolation=interp)


def topk(scores: np.ndarray, classes: list, k: int = 3, unknown_below: float | None = None) -> list:
    """Per row: [(label, score)] best first; the top label becomes ``unknown`` when its score is
    below ``unknown_below`` (scores are the heads' outputs: ridge regression targets, ~1 = sure)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(scores), 1))
    out = []
    for row, ids in zip(scores, part):
        ids = ids[np.argsort(-row[ids])]
        items = [(classes[i], float(row[i])) for i in ids]
        if unknown_below is not None and items and items[0][1] < unknown_below:
            items[0] = (UNKNOWN, items[0][1])
        out.append(items)
    return out


class Runtime:
    """Open an engine directory for inference and enrollment (verifies the manifest hashes)."""

    def __init__(self, engine_dir, backend: str = "auto", store=None, threads: int = 0, policy=None,
                 project_in_engine: bool = True, precision: str | None = None, log: Callable = print):
        self.engine_dir = Path(engine_dir)
        manifest = open_engine_dir(engine_dir).manifest  # hashes verified, heads match classes.json
        self.manifest = manifest
        self.size = int(manifest.input.size)
        self.aggregation = manifest.aggregation
        self.heads = ClassHeads(engine_dir, manifest, store, policy=policy, log=log)
        proj = self.heads.projections if project_in_engine else None
        self.backend = open_backend(engine_dir, manifest, backend, threads, log, projections=proj, precision=precision)
        self.log = log

    @property
    def classes(self) -> list:
        return self.heads.classes

    def fit(self, frame: np.ndarray) -> np.ndarray:
        return fit_frame(frame, self.size)

    def features(self, frames: np.ndarray, batch: int = 32) -> dict:
        out: dict = {}
        for s in range(0, len(frames), batch):
            for ln, f in self.backend.infer(frames[s:s + batch]).items():
                out.setdefault(ln, []).append(f)
        return {ln: np.concatenate(v) for ln, v in out.items()}

    def predict_features(self, feats: dict) -> tuple:
        """(scores [N, C] as the manifest says: the aggregate or one learner; weights [N, L] or None)."""
        return predict(self.heads.logits(feats), self.aggregation, return_weights=True)

    def classify(self, frames: np.ndarray) -> dict:
        """Fitted uint8 frames -> ``{"scores", "weights", "engine_ms", "heads_ms"}``."""
        t0 = time.perf_counter()
        feats = self.backend.infer(frames)
        t1 = time.perf_counter()
        scores, w = self.predict_features(feats)
        t2 = time.perf_counter()
        return {"scores": scores, "weights": w, "engine_ms": 1000 * (t1 - t0), "heads_ms": 1000 * (t2 - t1)}

    def enroll_source(self, name: str, spec: str, max_frames: int | None = None, views=None) -> dict:
        """Enroll class ``name`` from the frames of a ``--source`` spec (an image folder, a video,
        a camera: its first ``max_frames`` frames); blank frames are skipped (not committed)."""
        from .enroll import usable_frames
        from .sources import open_source

        with open_source(spec, size=self.size, log=self.log) as src:
            raw = []
            for f in src:
                raw.append(self.fit(f))
                if max_frames is not None and len(raw) >= max_frames:
                    break
        return self.enroll_frames(name, usable_frames(raw, spec), views=views)

    def enroll_frames(self, name: str, frames: np.ndarray, views=None, average_views: bool | None = None) -> dict:
        """Augment fitted frames, extract features, update the heads (not yet committed)."""
        from .enroll import AVERAGE_VIEWS, DEFAULT_VIEWS, augment_views, view_rows

        self.heads.check_enrollable()
        views = tuple(views or DEFAULT_VIEWS)
        average = AVERAGE_VIEWS if average_views is None else average_views
        t0 = time.perf_counter()
        inputs = self.heads.head_inputs(self.features(augment_views(frames, views)))
        rows = {ln: view_rows(x, len(views), average) for ln, x in inputs.items()}
        t1 = time.perf_counter()
        info = self.heads.enroll(name, rows)
        info.update({"frames": len(frames), "features_ms": 1000 * (t1 - t0)})
        return info
