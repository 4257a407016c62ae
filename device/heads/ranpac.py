"""The RanPAC head (McDonnell et al., NeurIPS 2023, Sec. 4, Eq. 3-4) on the device: RanPAC
alone and both SAFE learners.

h = ReLU(W_rand^T f) (plain ridge on f without W_rand), logits = h W with W = (G + lambda I)^-1 Q.
Tensors: ``W`` (M x C), ``W_rand`` (d x M, optional), ``lambda``; statistics ``G``, ``Q`` and
``counts`` (samples per class) in ``stats.safetensors``.

Enrollment (docs/DEVICE.md): the new class's rows update G and Q by a rank-k update and W by
Woodbury's identity (:class:`edgecl.device.ranpac.RidgeHead`). Imbalance: the engine classes
were learned from n_ref samples each (recorded counts, else
:func:`~edgecl.device.ranpac.estimate_class_counts`), a new class brings n_c << n_ref rows; rows
of class c enter G with weight (n_ref/n_c)^alpha and its Q column with (n_ref/n_c)^beta, alpha
and beta from the store's weighting policy (:data:`edgecl.device.enroll.POLICIES`).
"""

from __future__ import annotations

import numpy as np

from edgecl.core.errors import EdgeclError

from ..ranpac import RidgeHead, balance_weights, estimate_class_counts
from .base import Head, register_head


def project(features: np.ndarray, W_rand) -> np.ndarray:
    """h = ReLU(W_rand^T f) (RanPAC Eq. 3), float32; plain ridge on f when W_rand is None."""
    f = np.asarray(features, dtype=np.float32)
    return f if W_rand is None else np.maximum(f @ np.asarray(W_rand, dtype=np.float32), 0.0)


@register_head
class RanPACHead(Head):
    kind = "ranpac"
    required = ("W", "lambda")
    enrollable = True

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.W = np.asarray(tensors["W"], np.float32)
        W_rand = tensors.get("W_rand")
        self.W_rand = None if W_rand is None else np.asarray(W_rand, np.float32)
        self.projection = self.W_rand
        self.lam = float(np.asarray(tensors["lambda"]).reshape(-1)[0])
        self._ridge = None
        self._n_ref = None
        self.current = self.W

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[1])

    @property
    def width(self) -> int:
        return int(self.W.shape[0])

    def inputs(self, features: np.ndarray) -> np.ndarray:
        return project(features, self.W_rand)

    def logits_of_inputs(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, np.float32) @ self.W

    # ----------------------------------------------------------------- with the store
    def attach(self, view) -> None:
        super().attach(view)
        st = view.state
        cached = st.W.get(view.learner)
        if cached is not None and cached.shape[1] == len(st.classes):
            self.current = np.asarray(cached, np.float32)
        elif st.unchanged():
            self.current = self.W
        else:
            view.log(f"solving the {view.learner} head once from the statistics (the store has no solution cached)")
            self.current = self.ridge().W.astype(np.float32)

    def scores(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, np.float32) @ self.current

    def base_statistics(self) -> tuple:
        """(G, Q, per-class counts) of the engine directory (generation 0)."""
        stats = self.view.base_stats()
        if "G" not in stats or "Q" not in stats:
            raise EdgeclError(f"engine directory {self.view.engine_dir} has no class statistics for learner "
                              f"{self.view.learner!r} (stats.safetensors: G, Q); enrollment needs them: re-export "
                              f"from a RanPAC/SAFE bundle")
        # copies: the ridge adds the enrolled rows into G, and the loader's arrays are shared
        G, Q = np.array(stats["G"], np.float64), np.array(stats["Q"], np.float64)
        counts = stats.get("counts")
        if counts is None:
            counts = estimate_class_counts(G, Q, G.shape[0]) if self.W_rand is not None else np.ones(Q.shape[1])
        return G, Q, np.asarray(counts, np.float64)

    def n_ref(self) -> float:
        """The engine classes' typical sample count (the median), the weighting's reference."""
        if self._n_ref is None:
            self.ridge()
        return self._n_ref

    def row_weights(self, n: int) -> tuple:
        """(weight of the class's rows in G, weight of its Q column) for a class of ``n`` rows."""
        pol = self.view.state.policy
        n_ref = self.n_ref()
        return float(balance_weights(n, n_ref, pol["alpha"])), float(balance_weights(n, n_ref, pol["beta"]))

    def ridge(self) -> RidgeHead:
        """The :class:`RidgeHead` over the engine's statistics and the store's enrolled rows
        (built on first use)."""
        if self._ridge is not None:
            return self._ridge
        G, Q_base, counts = self.base_statistics()
        self._n_ref = float(np.median(counts)) if len(counts) else 1.0
        st = self.view.state
        Q = np.zeros((G.shape[0], len(st.classes)))
        n_by_uid = st.counts()
        for j, c in enumerate(st.classes):
            if c.base is not None:
                Q[:, j] = Q_base[:, c.base]
        for j, c in enumerate(st.classes):
            if c.uid is not None:
                H = self.view.rows[st.rows_of(c.uid)].astype(np.float64)
                wg, wq = self.row_weights(n_by_uid.get(c.uid, 0))
                G += wg * (H.T @ H)
                Q[:, j] = wq * H.sum(0)
        W = st.W.get(self.view.learner)
        ok = W is not None and W.shape == Q.shape
        self._ridge = RidgeHead(G, Q, self.lam, W=W if ok else None, refactor_every=self.view.refactor_every)
        return self._ridge

    def prepare(self) -> None:
        self.ridge().prepare()

    def add_class(self) -> None:
        self.ridge().add_classes(1)

    def enroll(self, j: int, new_rows: np.ndarray, old_rows: np.ndarray) -> None:
        """Rank-k update for class ``j``: its new rows at the weights of its new size, and its earlier
        rows re-weighted from their old size's weights to the new ones."""
        k, n_old = len(new_rows), len(old_rows)
        wg0, wq0 = self.row_weights(n_old) if n_old else (0.0, 0.0)
        wg1, wq1 = self.row_weights(n_old + k)
        parts = [(np.asarray(new_rows, np.float32), wg1, wq1)]
        if n_old and (wg1 != wg0 or wq1 != wq0):
            parts.append((old_rows, wg1 - wg0, wq1 - wq0))
        F = np.concatenate([p[0] for p in parts])
        d = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
        rh = self.ridge()
        E = np.zeros((len(F), rh.num_classes))
        E[:, j] = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
        rh.update(F, d, E)
        self.current = rh.W.astype(np.float32)

    def remove(self, j: int, entry, rows: np.ndarray) -> None:
        """Drop class ``j``'s column (exact: W's columns are independent given G); an enrolled
        class's rows are also downdated out of G (an engine class's samples stay in G, as data of
        no remaining class)."""
        rh = self.ridge()
        rh.drop_classes([j])
        if entry.uid is not None and len(rows):
            wg, _ = self.row_weights(len(rows))
            rh.update(rows, np.full(len(rows), -wg), np.zeros((len(rows), rh.num_classes)))
        self.current = rh.W.astype(np.float32)

    def refactor(self) -> None:
        self.ridge().refactor(resolve_W=True)
        self.current = self.ridge().W.astype(np.float32)

    def solution(self) -> np.ndarray:
        return self.current
