"""Calibration data: images for INT8 calibration and a data reader over them.

Sources: an ImageFolder given with ``--calib-data`` (``DIR/<class>/*`` or ``DIR/train/<class>/*``)
or, by default, the bundle's own training data (``config.data.root``/train). ``count`` images
(``--calib-count``, at most 256 by default) are taken round-robin over the classes (the first
files of each class, sorted by name), decoded like the training data, and handed to the graph
as uint8 NHWC in its channel order. :func:`data_sha256` fingerprints exactly those bytes for
the calibration cache key.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from edgecl.core.errors import EdgeclError


def _image_root(path: Path) -> Path:
    return path / "train" if (path / "train").is_dir() else path


def bundle_train_dir(manifest):
    """The training images of a bundle (:class:`edgecl.core.formats.BundleManifest`) when they are here."""
    root = manifest.data_config.get("root")
    if not root:
        return None
    p = Path(root)
    return _image_root(p) if p.is_dir() else None


def load_calibration_images(source, size: int, count: int, cache_dir=None, what: str = "--calib-data") -> np.ndarray:
    """``count`` uint8 RGB [N, size, size, 3] images from the ImageFolder ``source``."""
    from edgecl.data import list_classes, load_imagefolder

    if count < 1:
        raise EdgeclError(f"--calib-count must be >= 1, got {count}")
    src = Path(source)
    if not src.is_dir():
        raise EdgeclError(f"{what} {src} does not exist; pass an ImageFolder (DIR/<class>/<images>)")
    root = _image_root(src)
    n_classes = len(list_classes(root, what))
    per_class = max(1, math.ceil(count / n_classes))
    images = load_imagefolder(root, size=size, per_class=per_class, cache_dir=cache_dir, progress=False, what=what)
    labels = np.asarray(images.labels)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image within its class
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        rank[idx] = np.arange(len(idx))
    order = np.lexsort((labels, rank))[:count]  # round-robin: 1st of every class, then 2nd, ...
    return np.ascontiguousarray(np.asarray(images.images)[np.sort(order)])


def data_sha256(frames: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{frames.dtype}|{tuple(frames.shape)}|".encode())
    h.update(np.ascontiguousarray(frames).tobytes())
    return h.hexdigest()


class FrameReader:
    """An ONNX Runtime ``CalibrationDataReader`` (get_next / rewind) over uint8 frames."""

    def __init__(self, frames: np.ndarray, input_name: str = "input", batch_size: int = 16):
        self.frames, self.input_name, self.batch_size = frames, input_name, batch_size
        self._pos = 0

    def __len__(self) -> int:
        return math.ceil(len(self.frames) / self.batch_size)

    def get_next(self):
        if self._pos >= len(self.frames):
            return None
        batch = self.frames[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: np.ascontiguousarray(batch)}

    def rewind(self) -> None:
        self._pos = 0

    def batches(self):
        self.rewind()
        while (b := self.get_next()) is not None:
            yield b[self.input_name]
