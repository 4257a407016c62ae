"""Video sources, as jetson-inference names them (``videoSource``):

=====================  =====================================================================
``/dev/videoN``, ``N``  V4L2 camera (OpenCV ``VideoCapture``)
``csi://N``             MIPI CSI camera: a GStreamer ``nvarguscamerasrc`` pipeline for OpenCV
``rtsp://...``          network stream (also ``http(s)://``), reconnected when it drops
``file.mp4|avi|mkv``    video file, read in order
``DIR``                 image folder, sorted by name
=====================  =====================================================================

Live sources (cameras, streams) are read by a thread that keeps only the newest frame, so a
slow consumer gets the current picture rather than a queue of stale ones (latency stays one
frame); when reading fails the capture is reopened (``reconnect`` tries, with back-off).
Files and folders are read frame by frame, nothing dropped.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.errors import EdgeclError
from edgecl.core.labels import shown
from edgecl.data.decode import decode_image

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
VIDEO_EXT = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".h264", ".264"}


def csi_pipeline(sensor_id: int = 0, width: int = 1280, height: int = 720, fps: int = 30, flip: int = 0) -> str:
    """The GStreamer pipeline OpenCV opens for ``csi://N`` (Jetson ``nvarguscamerasrc``);
    ``appsink drop=1 max-buffers=1`` keeps only the newest frame."""
    return (f"nvarguscamerasrc sensor-id={sensor_id} ! "
            f"video/x-raw(memory:NVMM), width=(int){width}, height=(int){height}, framerate=(fraction){fps}/1, "
            f"format=(string)NV12 ! nvvidconv flip-method={flip} ! video/x-raw, format=(string)BGRx ! "
            f"videoconvert ! video/x-raw, format=(string)BGR ! appsink drop=1 max-buffers=1")


def parse_source(spec: str) -> tuple:
    """(kind, argument): kind in camera, csi, stream, file, folder."""
    spec = str(spec).strip()
    if re.fullmatch(r"\d+", spec):
        return "camera", int(spec)
    m = re.fullmatch(r"/dev/video(\d+)", spec)
    if m:
        return "camera", spec
    m = re.fullmatch(r"csi://(\d+)", spec)
    if m:
        return "csi", int(m.group(1))
    if re.match(r"^(rtsp|rtmp|http|https)://", spec):
        return "stream", spec
    p = Path(spec)
    if p.is_dir():
        return "folder", p
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXT and not _utf8(spec):
            raise EdgeclError(f"--source {shown(spec)}: OpenCV cannot open a video whose path is not valid UTF-8; "
                              f"rename it")
        return "file", p
    if not p.exists():
        raise EdgeclError(f"--source {shown(spec)}: no such file, folder or camera (use /dev/videoN, an index, "
                          f"csi://N, rtsp://..., a video file or an image folder)")
    raise EdgeclError(f"--source {shown(spec)} is not a file or folder")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cv2_capture(kind: str, arg):
    import cv2

    if kind == "csi":
        return cv2.VideoCapture(csi_pipeline(arg), cv2.CAP_GSTREAMER)
    if kind == "camera":
        return cv2.VideoCapture(arg, cv2.CAP_V4L2) if isinstance(arg, str) else cv2.VideoCapture(arg)
    return cv2.VideoCapture(str(arg))


class Source:
    """``read()`` -> a BGR frame, or None at the end; ``live``: frames may be dropped."""

    live = False
    spec = ""
    frames_read = 0
    frames_dropped = 0

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __iter__(self):
        while True:
            f = self.read()
            if f is None:
                return
            yield f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_file_frame(path, size: int | None = None) -> np.ndarray:
    """An image file as a BGR frame through the one decode path (:mod:`edgecl.data.decode`: the
    trainer's pixels; at the model's ``size`` when given, as the trainer decodes its images)."""
    return np.ascontiguousarray(decode_image(path, size)[:, :, ::-1])


class FolderSource(Source):
    """The images of a folder, sorted by name; a file that does not decode is skipped with a line
    naming it."""

    def __init__(self, folder: Path, size: int | None = None, log: Callable = print):
        self.spec, self.size, self.log = str(folder), size, log
        self.files = sorted(f for f in Path(folder).iterdir()
                            if f.suffix.lower() in IMAGE_EXT and not f.name.startswith(".") and f.is_file())
        if not self.files:
            raise EdgeclError(f"--source {shown(folder)}: the folder has no images "
                              f"({', '.join(sorted(IMAGE_EXT))})")
        self.pos = 0

    def read(self) -> np.ndarray | None:
        while self.pos < len(self.files):
            f = self.files[self.pos]
            self.pos += 1
            try:
                frame = read_file_frame(f, self.size)
            except EdgeclError as exc:
                self.log(f"skipping {shown(f)}: {exc}")
                continue
            self.frames_read += 1
            return frame
        return None


class CaptureSource(Source):
    """An OpenCV capture (camera, CSI pipeline, stream or video file). ``opener()`` returns a
    fresh capture (injectable for tests). Live: reopened up to ``reconnect`` times when reading
    fails, and read by a thread keeping only the newest frame (``threaded``)."""

    def __init__(self, spec: str, opener: Callable, live: bool, reconnect: int = 10, backoff_s: float = 0.5,
                 threaded: bool | None = None, log: Callable = print):
        self.spec, self.opener, self.live, self.log = spec, opener, live, log
        self.reconnect, self.backoff_s = reconnect, backoff_s
        self.reconnects = 0
        self.cap = self._open(first=True)
        self.threaded = live if threaded is None else threaded
        self._latest, self._seq, self._taken = None, 0, 0
        self._done = False
        self._cond = threading.Condition()
        if self.threaded:
            self._thread = threading.Thread(target=self._grab_loop, daemon=True)
            self._thread.start()

    def _open(self, first: bool = False):
        cap = self.opener()
        if cap is None or not cap.isOpened():
            if first:
                raise EdgeclError(f"cannot open source {self.spec}: OpenCV could not open it (check the device "
                                  f"exists and is not in use, the URL, or the file format)")
            return None
        return cap

    def _read_once(self) -> np.ndarray | None:
        """One frame, reconnecting a live source when it fails; None = the end."""
        while True:
            if self.cap is not None:
                ok, frame = self.cap.read()
                if ok and frame is not None:
                    return frame
            if not self.live:
                return None
            if self.reconnects >= self.reconnect:
                self.log(f"source {self.spec}: lost, and {self.reconnect} reconnection attempts failed")
                return None
            self.reconnects += 1
            self.log(f"source {self.spec}: no frame; reconnecting ({self.reconnects}/{self.reconnect})")
            if self.cap is not None:
                self.cap.release()
            time.sleep(self.backoff_s * min(self.reconnects, 4))
            self.cap = self._open()

    def _grab_loop(self) -> None:
        while not self._done:
            frame = self._read_once()
            with self._cond:
                if frame is None:
                    self._done = True
                else:
                    self._latest = frame
                    self._seq += 1
                self._cond.notify_all()

    def read(self) -> np.ndarray | None:
        if not self.threaded:
            frame = self._read_once()
            if frame is not None:
                self.frames_read += 1
            return frame
        with self._cond:
            while self._seq == self._taken and not self._done:
                self._cond.wait(0.5)
            if self._seq == self._taken:
                return None
            self.frames_dropped += self._seq - self._taken - 1
            self._taken = self._seq
            self.frames_read += 1
            return self._latest

    def close(self) -> None:
        self._done = True
        if self.threaded and self._thread.is_alive():
            self._thread.join(timeout=2)
        if self.cap is not None:
            self.cap.release()


def open_source(spec: str, opener: Callable | None = None, reconnect: int = 10, size: int | None = None,
                log: Callable = print) -> Source:
    """A :class:`Source` for a jetson-inference style ``--source`` string (module docstring).
    Image files (a folder, one image) are decoded by the trainer's decode path, at ``size`` when
    given (the model's input size: then they give the trainer's pixels exactly)."""
    kind, arg = parse_source(spec)
    if kind == "folder":
        return FolderSource(arg, size, log)
    if kind == "file" and Path(arg).suffix.lower() in IMAGE_EXT:
        return _single_image(arg, size)
    live = kind in ("camera", "csi", "stream")
    return CaptureSource(str(spec), opener or (lambda: _cv2_capture(kind, arg)), live, reconnect, log=log)


def _single_image(path: Path, size: int | None = None) -> Source:
    img = read_file_frame(path, size)

    class One(Source):
        spec, done = str(path), False

        def read(self):
            if self.done:
                return None
            self.done = True
            self.frames_read = 1
            return img

    return One()
