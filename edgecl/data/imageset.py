"""The :class:`ImageSet`: decoded uint8 images, their labels and class names, and a content key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class ImageSet:
    """Decoded images with their labels.

    ``images`` is uint8 ``[N, S, S, 3]`` RGB (often a read-only ``np.memmap`` from the cache;
    index it with sorted index arrays for sequential reads); ``labels`` is int64 ``[N]``, an
    index into ``class_names``; ``key`` is a stable hash of the content (used to cache features).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    key: str

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"ImageSet: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageSet":
        """The images at ``idx`` (int indices or a boolean mask), copied into memory; the key
        is derived from this set's key and the indices."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        digest = hashlib.sha256(f"{self.key}:subset:".encode() + idx.astype("<i8").tobytes()).hexdigest()
        return ImageSet(np.asarray(self.images[idx]), self.labels[idx], list(self.class_names), digest[:32])

    def relabel(self, class_names: Sequence[str]) -> tuple:
        """``(rows, labels)``: the images whose class name is in ``class_names`` and its index
        there (how a bundle or an engine directory, with its own class order, scores a folder)."""
        index = {name: i for i, name in enumerate(class_names)}
        mapped = np.array([index.get(name, -1) for name in self.class_names], dtype=np.int64)[self.labels]
        rows = np.flatnonzero(mapped >= 0)
        return rows, mapped[rows]

    def select_classes(self, classes: Sequence[int]) -> "ImageSet":
        """The images whose label is in ``classes`` (dataset class indices), in their order here."""
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))))
