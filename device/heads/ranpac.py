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

Calibration of the enrolled classes (a policy with a ``margin``; docs/DEVICE.md, "Enrollment
across class splits"): an enrolled class's logit is mapped so that its distribution over the
engine's training samples — all of them negatives for it — has the mean and standard deviation of
a typical engine class's logit over the same samples (the medians over the engine's classes, whose
own samples, a C-th of them, are among those samples), less ``margin`` of those standard
deviations. Both are closed-form from the statistics: with
N samples, mean m = (sum_c Q0_c) / N and second moment G0 / N, class j's logit has mean m^T W_j
and variance W_j^T G0 W_j / N - (m^T W_j)^2, where G0 W_j = Q_j - lambda W_j - sum_e w_e H_e^T H_e W_j
(A W = Q with A = G0 + sum_e w_e H_e^T H_e + lambda I), so no M x M matrix is touched: O(R M) per
enrolled class for R enrolled rows. The engine's own classes keep their logits.
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
        self._reference = None  # (mean, sd) of a typical engine class's logit over the engine's samples
        self._sample_stats = None  # (N, mean head input, Q0) of the engine's samples
        self._affine = None  # (columns, scale, offset) of the enrolled classes' logits; None: to compute
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
        self._affine = None
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
        out = np.asarray(h, np.float32) @ self.current
        cols, scale, offset = self.affine()
        if len(cols):
            out[..., cols] = out[..., cols] * scale + offset
        return out

    # ----------------------------------------------------------------- calibration of enrolled classes
    def _samples(self) -> tuple:
        """(N, mean head input m, Q0) of the engine's training samples, from its statistics (kept)."""
        if self._sample_stats is None:
            Q0 = np.asarray(self.view.stat("Q"), np.float64)
            counts = self.view.stat("counts")
            n = float(np.sum(counts)) if counts is not None else float(np.sum(self.base_statistics()[2]))
            self._sample_stats = (n, Q0.sum(1) / max(n, 1.0), Q0)
        return self._sample_stats

    def _logit_moments(self, W: np.ndarray, G0W: np.ndarray, n: float, m: np.ndarray) -> tuple:
        """(mean, sd) of each column's logit over the engine's samples, given G0 W."""
        mean = m @ W
        var = np.einsum("mc,mc->c", W, G0W) / n - mean ** 2
        return mean, np.sqrt(np.maximum(var, 1e-30))

    def reference(self) -> tuple:
        """(mean, sd): the medians over the engine's classes of their logits' mean and standard
        deviation over the engine's training samples (G0 W0 = Q0 - lambda W0: exact, O(M C))."""
        if self._reference is None:
            n, m, Q0 = self._samples()
            W0 = self.W.astype(np.float64)
            mean, sd = self._logit_moments(W0, Q0 - self.lam * W0, n, m)
            self._reference = (float(np.median(mean)), float(np.median(sd)))
        return self._reference

    def affine(self) -> tuple:
        """(columns, scale, offset) mapping the enrolled classes' logits (see the module docstring);
        empty without enrolled classes or when the policy has no ``margin``."""
        if self._affine is not None:
            return self._affine
        none = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
        st = self.view.state if self.view is not None else None
        margin = None if st is None else st.policy.get("margin")
        cols = [] if st is None else [j for j, c in enumerate(st.classes) if c.uid is not None]
        if margin is None or not cols or self.view.stat("Q") is None:
            self._affine = none
            return none
        n, m, _ = self._samples()
        W = np.asarray(self.current, np.float64)[:, cols]
        rows = np.asarray(self.view.rows, np.float64)
        Q = np.zeros_like(W)
        weighted = np.zeros_like(rows)  # every enrolled row times its class's weight in G
        for i, (_j, sel, wg, wq) in enumerate(self._enrolled()):  # in the order of cols
            Q[:, i] = wq * rows[sel].sum(0)
            weighted[sel] = wg * rows[sel]
        G0W = Q - self.lam * W - weighted.T @ (rows @ W)
        mean, sd = self._logit_moments(W, G0W, n, m)
        ref_mean, ref_sd = self.reference()
        scale = ref_sd / sd
        offset = ref_mean - mean * scale - float(margin) * ref_sd
        self._affine = (np.asarray(cols, np.int64), scale.astype(np.float32), offset.astype(np.float32))
        return self._affine

    def settle(self) -> None:
        """The state changed (rows appended, a class removed): recompute the calibration now."""
        self._affine = None
        self.affine()

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
            counts = self.view.stat("counts")
            if counts is not None:  # recorded: no need to read G
                self._n_ref = float(np.median(counts)) if len(counts) else 1.0
            else:
                self.ridge()
        return self._n_ref

    def _enrolled(self):
        """Per enrolled class, in logit order: (its column j, the indices of its rows, the weight of
        its rows in G, the weight of its Q column): what the ridge and the calibration add."""
        st = self.view.state
        n_by_uid = st.counts()
        for j, c in enumerate(st.classes):
            if c.uid is not None:
                yield (j, st.rows_of(c.uid), *self.row_weights(n_by_uid.get(c.uid, 0)))

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
        for j, c in enumerate(st.classes):
            if c.base is not None:
                Q[:, j] = Q_base[:, c.base]
        for j, sel, wg, wq in self._enrolled():
            H = self.view.rows[sel].astype(np.float64)
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
        self._affine = None

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
        self._affine = None

    def refactor(self) -> None:
        self.ridge().refactor(resolve_W=True)
        self.current = self.ridge().W.astype(np.float32)
        self._affine = None

    def solution(self) -> np.ndarray:
        return self.current
