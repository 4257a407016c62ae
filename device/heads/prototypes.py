"""The prototype head (SimpleCIL; Zhou et al., 2023, Sec. 4) on the device: logits = cos(f, mu_c)
with mu_c = sums_c / counts_c. Tensors: ``sums`` (C x d), ``counts`` (C). Enrollment needs no
solve: an enrolled class's prototype is the mean of its rows."""

from __future__ import annotations

import numpy as np

from .base import Head, register_head


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_logits(features: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    means = np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(counts, dtype=np.float64), 1)[:, None]
    return _l2n(np.asarray(features, dtype=np.float32)) @ _l2n(means.astype(np.float32)).T


@register_head
class PrototypeHead(Head):
    kind = "prototypes"
    required = ("sums", "counts")
    enrollable = True

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.sums = np.asarray(tensors["sums"], np.float64)
        self.counts = np.asarray(tensors["counts"], np.float64)
        self._cache: dict = {}

    @property
    def num_classes(self) -> int:
        return int(self.sums.shape[0])

    @property
    def width(self) -> int:
        return int(self.sums.shape[1])

    def logits_of_inputs(self, h: np.ndarray) -> np.ndarray:
        return prototype_logits(h, self.sums, self.counts)

    def current(self) -> tuple:
        """(sums, counts) of the store's current classes (cached until the classes or rows change)."""
        st = self.view.state
        key = (len(st.row_uid), tuple(st.names))
        if key not in self._cache:
            sums, counts = [], []
            for c in st.classes:
                if c.base is not None:
                    sums.append(self.sums[c.base])
                    counts.append(float(self.counts[c.base]))
                else:
                    sel = st.rows_of(c.uid)
                    sums.append(self.view.rows[sel].astype(np.float64).sum(0))
                    counts.append(float(len(sel)))
            self._cache = {key: (np.stack(sums), np.asarray(counts))}
        return self._cache[key]

    def scores(self, h: np.ndarray) -> np.ndarray:
        return prototype_logits(h, *self.current())

    def add_class(self) -> None:
        pass

    def enroll(self, j: int, new_rows: np.ndarray, old_rows: np.ndarray) -> None:
        pass  # the rows themselves are the statistics (appended to the state by ClassHeads)
