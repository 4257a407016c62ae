"""``edgecl bench ENGINE_DIR --json``: the device's figures on this machine.

* engine latency at batch 1 (median, p90) -- the backend call only;
* host overhead per frame: everything of :func:`edgecl.device.loop.process_frame` but the
  engine call (resize from ``frame_size``, heads, aggregation, top-k, overlay, JSON line);
* frames per second of that loop (no capture, no display);
* enrollment per class beyond feature extraction: projection + rank-k update of every ridge
  head, the classifier alignment of a linear (SLCA-family) head (``enroll_ms`` median over
  ``enroll_classes`` classes of ``enroll_frames`` frames x views),
  and the one-time preparation (loading G, first Cholesky factor) separately; on an engine with
  unknown rejection, the threshold's recomputation after each enrollment (``threshold_ms``: the
  held-out images through the new heads; the first one also projects them, once);
* store size: bytes of one committed generation after those classes, and of the whole store.

Enrollment goes to a temporary store; the engine directory's own store is not touched.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import Callable

import numpy as np


def synthetic_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random BGR frames (a stand-in camera; timing only)."""
    import cv2

    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return np.stack([cv2.resize(s, (w, h), interpolation=cv2.INTER_CUBIC) for s in small])


def _stats(xs) -> dict:
    xs = np.asarray(xs, np.float64)
    return {"median": round(float(np.median(xs)), 3), "p90": round(float(np.percentile(xs, 90)), 3),
            "mean": round(float(xs.mean()), 3)}


def run_bench(engine_dir, backend: str = "auto", frames: int = 200, warmup: int = 20, frame_size=(480, 640),
              enroll_classes: int = 5, enroll_frames: int = 20, threads: int = 0, log: Callable = print) -> dict:
    from .enroll import AVERAGE_VIEWS, DEFAULT_VIEWS
    from .loop import process_frame
    from .runtime import Runtime

    tmp = tempfile.mkdtemp(prefix="edgecl-bench-store-")
    try:
        rt = Runtime(engine_dir, backend, store=tmp, threads=threads, log=log)
        h, w = frame_size
        cam = synthetic_frames(16, h, w)
        engine, host, fps_frames = [], [], 0
        for i in range(warmup):
            process_frame(rt, cam[i % len(cam)], i, 30.0)
        start = time.perf_counter()
        for i in range(frames):
            _, _, t = process_frame(rt, cam[i % len(cam)], i, 30.0)
            engine.append(t["engine_ms"])
            host.append(t["host_ms"])
            fps_frames += 1
        wall = time.perf_counter() - start
        result = {"engine_dir": str(engine_dir), "backend": rt.backend.name, "batch": 1,
                  "frame_size": f"{w}x{h}", "input_size": rt.size, "frames": frames,
                  "engine_ms": _stats(engine), "host_ms": _stats(host),
                  "host_fraction_of_engine": round(float(np.median(host) / np.median(engine)), 4),
                  "fps": round(fps_frames / wall, 2)}

        heads = rt.heads.heads
        if not all(h.enrollable for h in heads.values()):
            kinds = ", ".join(sorted({h.kind for h in heads.values() if not h.enrollable}))
            result["enroll"] = {"skipped": f"the engine's {kinds} head cannot enroll"}
            return result
        t0 = time.perf_counter()
        rt.heads.prepare()  # load the statistics, first factorisation
        prepare_ms = 1000 * (time.perf_counter() - t0)
        enroll_ms, feat_ms, commit_ms, threshold_ms = [], [], [], []
        for c in range(enroll_classes):
            imgs = synthetic_frames(enroll_frames, rt.size, rt.size, seed=100 + c)
            info = rt.enroll_frames(f"bench-{c}", imgs, views=DEFAULT_VIEWS)
            feat_ms.append(info["features_ms"])
            enroll_ms.append(info["update_ms"])
            if "threshold_ms" in info:
                threshold_ms.append(info["threshold_ms"])
            t0 = time.perf_counter()
            rt.heads.commit()
            commit_ms.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for head in heads.values():
            head.refactor()
        refactor_ms = 1000 * (time.perf_counter() - t0)
        gens = rt.heads.store.generations()
        result.update({
            "enroll": {"classes": enroll_classes, "frames_per_class": enroll_frames, "views": list(DEFAULT_VIEWS),
                       "rows_per_class": enroll_frames * (1 if AVERAGE_VIEWS else len(DEFAULT_VIEWS)),
                       "heads": {ln: {"kind": h.kind, "row_width": h.width, **h.last_update}
                                 for ln, h in heads.items()},
                       "enroll_ms_per_class": _stats(enroll_ms) if enroll_ms else None,
                       "feature_ms_per_class": _stats(feat_ms) if feat_ms else None,
                       "commit_ms": _stats(commit_ms) if commit_ms else None,
                       "threshold_ms": _stats(threshold_ms) if threshold_ms else None,
                       "prepare_ms_once": round(prepare_ms, 1),
                       "refactor_ms": round(refactor_ms, 1), "refactor_every": rt.heads.refactor_every,
                       "enroll_ms_amortized": round(float(np.median(enroll_ms))
                                                    + refactor_ms / rt.heads.refactor_every, 1)
                       if enroll_ms else None},
            "store_generation_bytes": (rt.heads.store.path / f"gen-{gens[0]:08d}.safetensors").stat().st_size
            if gens else 0,
            "store_bytes": rt.heads.store.size_bytes(),
        })
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
