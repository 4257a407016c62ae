"""``edgecl run``: capture -> resize -> infer -> heads -> aggregate -> overlay -> window / headless.

``--jsonl FILE`` writes one JSON object per frame: ``frame`` (index from 0), ``top`` ([label,
score] best first), ``weights`` ({learner: aggregation weight}, SAFE only, else null),
``latency_ms`` (resize to JSON line), ``engine_ms`` and ``host_ms`` (the rest), and when the
engine judges unknowns (docs/DEVICE.md, "Unknown rejection") ``unknown`` (true: the top label is
``unknown``), ``score`` (the rejection score), ``threshold`` (what it must reach) and
``confidence`` (the calibrated probability that the top class is right). In a window,
``e`` enrolls the next ``enroll_frames`` frames as a new class (``--enroll-name``, else
``class-N``) and ``q`` / Esc quits.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Callable

import numpy as np

from .runtime import Runtime


def verdict_of(verdict: dict | None, row: int) -> dict | None:
    """One row of :meth:`Runtime.judge`'s arrays as JSON-ready numbers (None when not judged)."""
    if verdict is None:
        return None
    conf = verdict["confidence"]
    return {"unknown": not bool(verdict["known"][row]), "score": round(float(verdict["score"][row]), 5),
            "threshold": round(float(verdict["threshold"]), 5),
            "confidence": None if conf is None else round(float(conf[row]), 4)}


def overlay(frame: np.ndarray, top: list, fps: float, note: str = "", in_place: bool = False,
            verdict: dict | None = None) -> np.ndarray:
    """Label, confidence (calibrated when the engine is, else the top score) and FPS drawn on the
    frame (``in_place``) or a copy."""
    import cv2

    out = frame if in_place else frame.copy()
    h = out.shape[0]
    scale = max(0.35, h / 480.0)
    label, score = top[0] if top else ("-", 0.0)
    if verdict is not None and verdict["confidence"] is not None and not verdict["unknown"]:
        first = f"{label} {100 * verdict['confidence']:.0f}%"
    elif verdict is not None and verdict["unknown"]:
        first = f"{label} (score {verdict['score']:.2f} < {verdict['threshold']:.2f})"
    else:
        first = f"{label} {score:.2f}"
    lines = [first, f"{fps:.1f} FPS"] + ([note] if note else [])
    for i, text in enumerate(lines):
        y = int((i + 1) * 22 * scale) + 2
        cv2.putText(out, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(out, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def frame_record(index: int, top: list, weights, learners: list, engine_ms: float, host_ms: float,
                 verdict: dict | None = None) -> str:
    w = None if weights is None else {ln: round(float(x), 4) for ln, x in zip(learners, weights)}
    return json.dumps({"frame": index, "top": [[lab, round(s, 5)] for lab, s in top], "weights": w,
                       "latency_ms": round(engine_ms + host_ms, 3), "engine_ms": round(engine_ms, 3),
                       "host_ms": round(host_ms, 3), **(verdict or {})})


def process_frame(rt: Runtime, frame: np.ndarray, index: int, fps: float, k: int = 3,
                  draw: bool = True, in_place: bool = False) -> tuple:
    """One frame through the whole loop minus capture and display: (record line, overlaid, timing)."""
    t0 = time.perf_counter()
    fitted = rt.fit(frame)
    res = rt.classify(fitted[None])
    top = rt.top(res, k)[0]
    verdict = verdict_of(res["open_set"], 0)
    shown = overlay(frame, top, fps, in_place=in_place, verdict=verdict) if draw else None
    weights = None if res["weights"] is None else res["weights"][0]
    total = 1000 * (time.perf_counter() - t0)
    line = frame_record(index, top, weights, list(rt.heads.learners), res["engine_ms"], total - res["engine_ms"],
                        verdict)
    host = 1000 * (time.perf_counter() - t0) - res["engine_ms"]
    return line, shown, {"engine_ms": res["engine_ms"], "host_ms": host, "top": top, "verdict": verdict}


def run_loop(rt: Runtime, source, headless: bool = False, jsonl: str | None = None,
             max_frames: int | None = None, k: int = 3,
             enroll_frames: int = 20, enroll_name: str | None = None, log: Callable = print) -> dict:
    """Run until the source ends, ``max_frames``, or ``q``; returns a summary."""
    cv2 = None
    if not headless:
        import cv2
    stack = contextlib.ExitStack()
    out = stack.enter_context(open(jsonl, "w")) if jsonl else None  # noqa: SIM115 - closed by the stack
    n, fps, engine, host = 0, 0.0, [], []
    collecting, enrolled, started = None, 0, time.perf_counter()
    last = started
    try:
        for frame in source:
            if max_frames is not None and n >= max_frames:
                break
            line, shown, t = process_frame(rt, frame, n, fps, k, draw=not headless)
            engine.append(t["engine_ms"])
            host.append(t["host_ms"])
            if out is not None:
                out.write(line + "\n")
            now = time.perf_counter()
            fps = 0.9 * fps + 0.1 * (1.0 / max(now - last, 1e-6)) if n else 1.0 / max(now - last, 1e-6)
            last = now
            n += 1
            if collecting is not None:
                collecting.append(rt.fit(frame))
                if len(collecting) >= enroll_frames:
                    name = enroll_name if enroll_name and enrolled == 0 else f"class-{len(rt.classes)}"
                    info = rt.enroll_frames(name, np.stack(collecting))
                    gen = rt.heads.commit()
                    enrolled += 1
                    log(f"enrolled {name!r} from {info['frames']} frames in {info['update_ms']:.0f} ms "
                        f"(committed generation {gen})")
                    collecting = None
            if cv2 is not None:
                note = f"enrolling {len(collecting)}/{enroll_frames}" if collecting is not None else ""
                cv2.imshow("edgecl", overlay(frame, t["top"], fps, note, verdict=t["verdict"]) if note else shown)
                key = cv2.waitKey(1) & 0xFF
                if key in (ord("q"), 27):
                    break
                if key == ord("e") and collecting is None:
                    collecting = []
    finally:
        stack.close()
        if cv2 is not None:
            cv2.destroyAllWindows()
    wall = time.perf_counter() - started
    summary = {"frames": n, "fps": round(n / wall, 2) if wall > 0 else 0.0,
               "engine_ms_median": round(float(np.median(engine)), 3) if engine else None,
               "host_ms_median": round(float(np.median(host)), 3) if host else None,
               "frames_dropped": getattr(source, "frames_dropped", 0), "enrolled": enrolled}
    return summary
