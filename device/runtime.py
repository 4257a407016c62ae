"""The device runtime: engine directory + backend + heads (with the store) -> predictions.

Per frame: :func:`fit_frame` (shorter side to the model's input size, centre crop; nothing to
do when the source already delivers that size) -> backend (preprocessing is in the graph) ->
each learner's head -> entropy-weighted aggregation (SAFE, gamma from the manifest) -> top-k,
the top label ``unknown`` when the rejection score is below the threshold that accepts
``--accept-rate`` of known images (:mod:`edgecl.device.openset`), with a calibrated confidence.
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


def topk(scores: np.ndarray, classes: list, k: int = 3, known=None) -> list:
    """Per row: [(label, score)] best first; the top label becomes ``unknown`` where ``known`` (a
    boolean per row, :meth:`Runtime.judge`) is False."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
        np.arange(scores.shape[1]), (len(scores), 1))
    out = []
    for row, ids in zip(scores, part):
        ids = ids[np.argsort(-row[ids])]
        items = [(classes[i], float(row[i])) for i in ids]
        out.append(items)
    if known is not None:
        for items, ok in zip(out, known):
            if items and not ok:
                items[0] = (UNKNOWN, items[0][1])
    return out


class Runtime:
    """Open an engine directory for inference and enrollment (verifies the manifest hashes)."""

    def __init__(self, engine_dir, backend: str = "auto", store=None, threads: int = 0, policy=None,
                 project_in_engine: bool = True, precision: str | None = None, accept_rate: float | None = None,
                 unknown_below: float | None = None, log: Callable = print):
        self.engine_dir = Path(engine_dir)
        manifest = open_engine_dir(engine_dir).manifest  # hashes verified, heads match classes.json
        self.manifest = manifest
        self.size = int(manifest.input.size)
        self.aggregation = manifest.aggregation
        self.heads = ClassHeads(engine_dir, manifest, store, policy=policy, log=log)
        proj = self.heads.projections if project_in_engine else None
        self.backend = open_backend(engine_dir, manifest, backend, threads, log, projections=proj, precision=precision)
        self.log = log
        self.unknown_below = unknown_below
        self.open_set = self._open_set(accept_rate, unknown_below)

    def _open_set(self, accept_rate, unknown_below):
        """The rejection of unknowns the engine directory was calibrated for (None: not calibrated)."""
        from .engine_dir import load_open_set
        from .openset import OpenSet, check_accept_rate

        if accept_rate is not None:
            check_accept_rate(accept_rate)
            if unknown_below is not None:
                raise EdgeclError("give --accept-rate (the share of known images to accept) or --unknown-below (a raw "
                                  "threshold on the rejection score), not both")
        calib = load_open_set(self.engine_dir, self.manifest)
        if calib is None:
            if accept_rate is not None:
                raise EdgeclError(f"--accept-rate: engine directory {self.engine_dir} was exported without unknown-"
                                  f"rejection calibration (no held-out training images); export it again with "
                                  f"--holdout-data DIR, or give a raw --unknown-below threshold")
            return None
        return OpenSet(calib, lambda inputs: self.predict_features(inputs)[0], self.heads.state_key,
                       self.heads.base_classes, accept_rate=accept_rate, unknown_below=unknown_below,
                       to_inputs=lambda feats: {f"{ln}:h": h for ln, h in self.heads.head_inputs(feats).items()})

    def open_set_line(self) -> str:
        """Set the unknown threshold up now (the held-out images' projection is computed once per
        process; done at start rather than on the first frame) and say what rejects a frame."""
        if self.open_set is None:
            return ("unknown rejection: off (the engine directory was exported without held-out training images; "
                    "--unknown-below S sets a raw threshold)" if self.unknown_below is None
                    else f"unknown rejection: top score below {self.unknown_below:g} (--unknown-below)")
        t0 = time.perf_counter()
        thr = self.open_set.threshold()
        if self.unknown_below is not None:
            return f"unknown rejection: {self.open_set.calib.score} score below {thr:g} (--unknown-below)"
        n = int(self.open_set.remaining().sum())
        if n == 0:
            return ("unknown rejection: off (every engine class was removed, so no held-out image is left to set "
                    "the threshold; --unknown-below S sets a raw one)")
        rate = 100 * self.open_set.accept_rate
        return (f"unknown rejection: {self.open_set.calib.score} score below {thr:.4g}, which {rate:g}% of {n} "
                f"held-out images of the engine's classes reach under the current heads "
                f"({1000 * (time.perf_counter() - t0):.0f} ms)")

    def judge(self, scores: np.ndarray) -> dict | None:
        """``{"score", "confidence", "known", "threshold"}`` per row of predicted scores (None when
        nothing is judged: an uncalibrated engine without --unknown-below)."""
        if self.open_set is not None:
            return self.open_set.judge(scores)
        if self.unknown_below is not None:  # an uncalibrated engine: the raw top score, as given
            top = np.asarray(scores, np.float64).max(1)
            return {"score": top, "confidence": None, "known": top >= self.unknown_below,
                    "threshold": float(self.unknown_below)}
        return None

    def top(self, res: dict, k: int = 3) -> list:
        """Top-k labels of each row of a :meth:`classify` result, ``unknown`` where it was rejected."""
        verdict = res.get("open_set")
        return topk(res["scores"], self.classes, k, None if verdict is None else verdict["known"])

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
        """Fitted uint8 frames -> ``{"scores", "weights", "open_set", "engine_ms", "heads_ms"}``
        (``open_set``: :meth:`judge` of the scores)."""
        t0 = time.perf_counter()
        feats = self.backend.infer(frames)
        t1 = time.perf_counter()
        scores, w = self.predict_features(feats)
        verdict = self.judge(scores)
        t2 = time.perf_counter()
        return {"scores": scores, "weights": w, "open_set": verdict, "engine_ms": 1000 * (t1 - t0),
                "heads_ms": 1000 * (t2 - t1)}

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
        if self.open_set is not None:  # the unknown threshold of the new classes, now rather than on the next frame
            t2 = time.perf_counter()
            self.open_set.threshold()
            info["threshold_ms"] = 1000 * (time.perf_counter() - t2)
        return info
