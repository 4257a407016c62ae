"""The camera thread of ``edgecl serve``: it owns inference, keeps only the newest frame.

One thread reads the source, classifies every frame with the :class:`~edgecl.device.runtime.Runtime`
(fit, engine, heads, aggregation, top-k: what :func:`edgecl.device.loop.process_frame` does) and
publishes a :class:`Shot`: the prediction and, while someone watches the stream, the annotated
frame as one JPEG. Only the newest shot is kept: a stream client that falls behind gets the
current picture, never a queue of stale ones.

The runtime is not thread-safe, so :attr:`Camera.lock` guards it: the thread holds it for each
frame, and every change of the classes (enroll, rename, remove, rollback, merge) holds it while it
updates and commits the heads (:mod:`.service`). Enrolling from live frames asks the thread for
the next N fitted frames (:meth:`Camera.grab`).

The source: live sources (cameras, streams) reconnect as in ``edgecl run``
(:class:`~edgecl.device.sources.CaptureSource`); when one gives up, or frames stop coming for
:data:`STALL_S`, the camera is reported lost (:meth:`Camera.status`) and the source is reopened
every ``reconnect_s`` while the server goes on serving. A video file or an image folder plays in a
loop at ``fps`` (default: the video's own rate, else :data:`DEFAULT_FPS`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from edgecl.core.errors import EdgeclError, one_line

from ..loop import overlay, verdict_of
from ..runtime import UNKNOWN

DEFAULT_FPS = 15.0
STALL_S = 3.0  # no frame for this long (and at least 5 frame intervals): the camera is reported lost
DISPLAY_MAX = 640  # the stream's longer side at most (larger frames are scaled down) ...
DISPLAY_MIN = 320  # ... and at least (smaller ones are scaled up, pixels kept sharp)


@dataclass
class Shot:
    """One processed frame: ``seq`` (from 1), ``captured`` (time.time() when it was read),
    the top-k ``top`` ([label, score] best first), SAFE's aggregation ``weights`` ({learner: w}
    or None), ``engine_ms`` / ``host_ms`` (host: everything of the frame but the engine, the JPEG
    included), ``jpeg`` (the annotated frame; None when nobody watched) and ``verdict`` (unknown
    or not, the rejection score, its threshold and the calibrated confidence; None when not judged)."""

    seq: int
    captured: float
    top: list
    weights: Optional[dict]
    engine_ms: float
    host_ms: float
    jpeg: Optional[bytes] = None
    verdict: Optional[dict] = None  # the unknown judgement (edgecl.device.loop.verdict_of), None when not judged


@dataclass
class Capture:
    """A request for the next ``want`` fitted frames (enrollment from the camera)."""

    name: str
    want: int
    frames: list = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


def display_frame(frame: np.ndarray) -> np.ndarray:
    """The frame as the stream shows it: its longer side within [DISPLAY_MIN, DISPLAY_MAX]."""
    import cv2

    h, w = frame.shape[:2]
    side = max(h, w)
    if side > DISPLAY_MAX:
        s = DISPLAY_MAX / side
        return cv2.resize(frame, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    if side < DISPLAY_MIN:
        s = max(1, DISPLAY_MIN // side)
        return cv2.resize(frame, (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    return frame.copy()


def encode_jpeg(img: np.ndarray, quality: int = 80) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise EdgeclError("could not encode a frame as JPEG")
    return buf.tobytes()


def placeholder(text: str, size: tuple = (240, 320)) -> bytes:
    """A grey JPEG saying ``text`` (what the stream shows while the camera is lost)."""
    import cv2

    img = np.full((*size, 3), 60, np.uint8)
    scale = max(0.5, size[1] / 640)
    cv2.putText(img, text, (10, size[0] // 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return encode_jpeg(img)


class Camera:
    """The camera thread (module docstring). ``open_source()`` returns a fresh
    :class:`~edgecl.device.sources.Source` (the first one may be given as ``source``)."""

    def __init__(self, rt, open_source: Callable, source=None, k: int = 3,
                 fps: Optional[float] = None, quality: int = 80, reconnect_s: float = 2.0, log: Callable = print):
        self.rt, self.open_source, self.k = rt, open_source, k
        self.fps_cap, self.quality, self.reconnect_s, self.log = fps, quality, reconnect_s, log
        self.lock = threading.RLock()  # the runtime's: one frame, or one change of the classes, at a time
        self._source = source
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._waiters: set = set()  # (event loop, future) of stream clients waiting for the next shot
        self.latest: Optional[Shot] = None
        self.seq = 0
        self.state, self.message = "starting", ""
        self.live = False
        self.interval = 0.0  # seconds per frame of a paced source
        self.last_frame = 0.0  # time.monotonic() of the newest frame
        self.fps = 0.0
        self.dropped = 0
        self.watchers = 0  # stream clients
        self._want_jpeg_until = 0.0  # a snapshot was asked for: encode until then
        self.capture: Optional[Capture] = None
        self.timings = collections.deque(maxlen=300)  # (engine_ms, host_ms) of the newest frames
        self.totals = [0.0, 0.0]  # engine_ms, host_ms summed over every frame (benchmarks take differences)
        self._placeholder: Optional[bytes] = None

    # ----------------------------------------------------------------- thread
    def start(self) -> "Camera":
        self._thread = threading.Thread(target=self._run, name="edgecl-camera", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _set_state(self, state: str, message: str = "") -> None:
        if (state, message) != (self.state, self.message):
            if state == "lost":
                self.log(f"camera: {message}")
            elif state == "live" and self.state == "lost":
                self.log("camera: back")
        self.state, self.message = state, message
        if state == "lost":
            self._placeholder = None

    def _run(self) -> None:
        while not self._stop.is_set():
            src, self._source = self._source, None
            if src is None:
                try:
                    src = self.open_source()
                except Exception as exc:  # noqa: BLE001 - any failure to open: say it, try again
                    self._set_state("lost", f"cannot open the source ({one_line(exc)}); retrying every "
                                            f"{self.reconnect_s:g} s")
                    self._stop.wait(self.reconnect_s)
                    continue
            self.live = bool(getattr(src, "live", False))
            self.interval = 0.0 if self.live else 1.0 / (self.fps_cap or self._source_fps(src) or DEFAULT_FPS)
            got = 0
            try:
                with src:
                    due = time.perf_counter()
                    for frame in src:
                        if self._stop.is_set():
                            return
                        self._set_state("live")
                        self._frame(frame)
                        self.dropped = getattr(src, "frames_dropped", 0)
                        got += 1
                        if self.interval:
                            due = max(due + self.interval, time.perf_counter() - self.interval)
                            self._stop.wait(max(0.0, due - time.perf_counter()))
            except Exception as exc:  # noqa: BLE001 - a source that fails mid-stream is a lost camera
                self._set_state("lost", f"the source failed ({one_line(exc)}); reopening")
            if self._stop.is_set():
                return
            if self.live or not got:
                if self.state != "lost":
                    self._set_state("lost", "the camera stopped delivering frames; reconnecting every "
                                            f"{self.reconnect_s:g} s")
                self._stop.wait(self.reconnect_s)
            # a video file or an image folder that ended plays again from the start

    @staticmethod
    def _source_fps(src) -> float:
        cap = getattr(src, "cap", None)
        try:
            import cv2

            fps = float(cap.get(cv2.CAP_PROP_FPS)) if cap is not None else 0.0
        except Exception:  # noqa: BLE001 - a capture that cannot tell
            fps = 0.0
        return fps if 0.5 <= fps <= 240 else 0.0

    def _frame(self, frame: np.ndarray) -> None:
        t0 = time.perf_counter()
        captured = time.time()
        rt = self.rt
        with self.lock:
            fitted = rt.fit(frame)
            res = rt.classify(fitted[None])
            top = rt.top(res, self.k)[0]
            verdict = verdict_of(res["open_set"], 0)
            weights = None if res["weights"] is None else {
                ln: round(float(w), 4) for ln, w in zip(rt.heads.learners, res["weights"][0])}
        cap = self.capture
        note = ""
        if cap is not None and not cap.done.is_set():
            cap.frames.append(fitted)
            note = f"enrolling {len(cap.frames)}/{cap.want}"
            if len(cap.frames) >= cap.want:
                cap.done.set()
        now = time.monotonic()
        if self.last_frame:
            inst = 1.0 / max(now - self.last_frame, 1e-6)
            self.fps = 0.9 * self.fps + 0.1 * inst if self.fps else inst
        self.last_frame = now
        jpeg = None
        if self.watchers > 0 or now < self._want_jpeg_until:
            shown = display_frame(frame)
            overlay(shown, top, self.fps, note, in_place=True, verdict=verdict)
            jpeg = encode_jpeg(shown, self.quality)
        host_ms = 1000 * (time.perf_counter() - t0) - res["engine_ms"]
        self.timings.append((res["engine_ms"], host_ms))
        self.totals[0] += res["engine_ms"]
        self.totals[1] += host_ms
        self.seq += 1
        self._publish(Shot(self.seq, captured, [[lab, round(s, 5)] for lab, s in top], weights,
                           round(res["engine_ms"], 3), round(host_ms, 3), jpeg, verdict))

    def _publish(self, shot: Shot) -> None:
        with self._cond:
            self.latest = shot
            waiters, self._waiters = self._waiters, set()
            self._cond.notify_all()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut, shot)

    # ----------------------------------------------------------------- clients
    async def next_shot(self, after: int, timeout: float) -> Optional[Shot]:
        """The newest shot once its ``seq`` is above ``after`` (None after ``timeout`` seconds)."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self.latest is not None and self.latest.seq > after:
                return self.latest
            fut = loop.create_future()
            self._waiters.add((loop, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            with self._cond:
                self._waiters.discard((loop, fut))

    def watch(self, delta: int) -> None:
        with self._cond:
            self.watchers += delta

    def want_jpeg(self, seconds: float = 2.0) -> None:
        """Encode frames for the next ``seconds`` (a snapshot was asked for)."""
        self._want_jpeg_until = max(self._want_jpeg_until, time.monotonic() + seconds)

    def lost_jpeg(self) -> bytes:
        """The stream's picture while the camera is lost (cached until it changes)."""
        if self._placeholder is None:
            self._placeholder = placeholder("camera lost - reconnecting")
        return self._placeholder

    def grab(self, name: str, n: int, timeout: float, lost_s: float = 1.0) -> list:
        """The next ``n`` frames, fitted to the model's input size (enrollment from the camera);
        fewer when ``timeout`` seconds pass first, the camera is lost for ``lost_s``, or the
        server stops."""
        cap = Capture(name, n)
        with self._cond:
            if self.capture is not None:
                raise EdgeclError("another enrollment is capturing frames; try again when it is done")
            self.capture = cap
        try:
            end, lost_since = time.monotonic() + timeout, None
            while not cap.done.wait(0.1):
                now = time.monotonic()
                lost = self.camera_state()[0] == "lost"
                lost_since = (lost_since or now) if lost else None
                if self._stop.is_set() or now > end or (lost_since is not None and now - lost_since >= lost_s):
                    break
        finally:
            with self._cond:
                self.capture = None
        return list(cap.frames[:n])

    # ----------------------------------------------------------------- status
    def camera_state(self) -> tuple:
        """(state, message): ``live``, ``starting`` or ``lost`` (frames stopped for STALL_S too)."""
        state, message = self.state, self.message
        if state == "live" and self.last_frame:
            age = time.monotonic() - self.last_frame
            if age > max(STALL_S, 5 * self.interval):
                state, message = "lost", f"no frame from the source for {age:.0f} s; waiting for it to come back"
        return state, message

    def status(self) -> dict:
        state, message = self.camera_state()
        shot = self.latest
        timings = list(self.timings)
        cap = self.capture
        top = shot.top if shot is not None else []
        return {
            "state": state, "message": message, "live_source": self.live, "fps": round(self.fps, 2),
            "frames": self.seq, "dropped": self.dropped, "watchers": self.watchers,
            "last_frame_age_s": round(time.monotonic() - self.last_frame, 3) if self.last_frame else None,
            "capture": None if cap is None else {"name": cap.name, "have": len(cap.frames), "want": cap.want},
            "prediction": None if shot is None else {
                "seq": shot.seq, "top": top, "unknown": bool(top) and top[0][0] == UNKNOWN,
                **{k: (shot.verdict or {}).get(k) for k in ("score", "threshold", "confidence")},
                "weights": shot.weights, "engine_ms": shot.engine_ms, "host_ms": shot.host_ms,
                "captured": shot.captured},
            "latency": {
                "engine_ms_median": round(float(np.median([t[0] for t in timings])), 3) if timings else None,
                "host_ms_median": round(float(np.median([t[1] for t in timings])), 3) if timings else None,
                "frames": len(timings), "engine_ms_total": round(self.totals[0], 3),
                "host_ms_total": round(self.totals[1], 3)},
        }


def _resolve(fut, shot) -> None:
    if not fut.done():
        fut.set_result(shot)
