"""RanPAC heads on the device: the ridge solution kept current under rank-k updates.

RanPAC (McDonnell et al., NeurIPS 2023, Sec. 4, Eq. 3-4): h = ReLU(W_rand^T f),
G = sum h h^T, Q = sum h y^T, W = (G + lambda I)^-1 Q.

Enrollment adds k rows (the new frames' projected features, with per-row weights d) to the
statistics: A' = A + H^T D H, Q' = Q + H^T E (A = G + lambda I, H k x M, D = diag(d), E k x C).
:class:`RidgeHead` updates W without a fresh O(M^3) solve, by the Woodbury identity in its
recursive-least-squares form:

    U = A^-1 H^T,   S = I + D H U,   W' = W + U S^-1 (E - D H W),   A'^-1 = A^-1 - U S^-1 D U^T

(O(k M^2) for U, O(k M C) for the rest). A^-1 X is the inverse of the last *refactored* matrix
(from its Cholesky factor) times X, minus the accumulated corrections U_j S_j^-1 D_j U_j^T; after
``refactor_every`` updates G is refactored (this bounds both the drift of the float32 products
and the cost of the correction chain). Negative weights downdate (removing
an enrolled class's rows).
"""

from __future__ import annotations

import math

import numpy as np

try:  # scipy's LAPACK/BLAS: Cholesky, inverse from it, symmetric products (numpy alone: dense inverse)
    from scipy.linalg import blas, cho_factor, cho_solve, lapack
except ImportError:  # pragma: no cover - a device image without scipy still works
    blas = cho_factor = cho_solve = lapack = None


def estimate_class_counts(G: np.ndarray, Q: np.ndarray, M: int) -> np.ndarray:
    """Samples per class behind (G, Q) when the bundle did not record them.

    For a Gaussian W_rand (entries N(0, 1)) and a feature f of norm s, each h_j = ReLU(w_j . f)
    has E h_j = s / sqrt(2 pi) and E h_j^2 = s^2 / 2, so 1^T Q 1 = sum_i 1^T h_i ~ M sum s / sqrt(2 pi)
    and tr G = sum ||h_i||^2 ~ M sum s^2 / 2, giving N ~ pi (1^T Q 1)^2 / (M tr G) (a slight
    underestimate when the norms vary); N is shared out by each column's mass 1^T Q_c.
    """
    mass = Q.sum(axis=0)
    total = float(mass.sum())
    if total <= 0 or M <= 0:
        return np.ones(Q.shape[1])
    n = math.pi * total ** 2 / (M * float(np.trace(G)))
    return n * mass / total


def balance_weights(counts, n_ref: float, alpha: float) -> np.ndarray:
    """Per-row weight (n_ref / n_c)^alpha: alpha = 1 makes every class weigh n_ref samples."""
    counts = np.asarray(counts, dtype=np.float64)
    return (n_ref / np.maximum(counts, 1e-12)) ** alpha


class RidgeHead:
    """W = (G + lambda I)^-1 Q with rank-k updates (see the module docstring).

    ``G`` (M x M) and ``Q`` (M x C) float64; ``W`` optional (solved when absent).
    """

    def __init__(self, G: np.ndarray, Q: np.ndarray, lam: float, W=None, refactor_every: int = 32,
                 solve_dtype=np.float32):
        self.G = np.array(G, dtype=np.float64)
        self.Q = np.array(Q, dtype=np.float64)
        self.lam = float(lam)
        self.refactor_every = int(refactor_every)
        self.solve_dtype = solve_dtype
        self._factor = None  # Cholesky factor of G_f + lambda I (G_f: G at the last refactor)
        self._corrections = []  # (U, S^-1 D): A^-1 = A_f^-1 - sum U (S^-1 D) U^T
        self._pending = []  # (H, d) rows not yet in self.G (added at refactor / statistics())
        self.updates = 0
        self._spare = 0  # spare columns in _Qbuf/_Wbuf (add_classes)
        self.W = None if W is None else np.array(W, dtype=np.float64)
        if self.W is None:
            self.W = self.solve_fresh()

    @property
    def M(self) -> int:
        return self.G.shape[0]

    @property
    def num_classes(self) -> int:
        return self.Q.shape[1]

    # ----------------------------------------------------------------- factor and solves
    def _materialize(self) -> None:
        for H, d in self._pending:
            H64 = H.astype(np.float64)
            self.G += H64.T @ (d[:, None] * H64)
        self._pending.clear()

    def statistics(self) -> tuple:
        """(G, Q) including every update so far."""
        self._materialize()
        return self.G, self.Q

    def solve_fresh(self) -> np.ndarray:
        """W from scratch, (G + lambda I)^-1 Q in float64 (O(M^3); the reference)."""
        G, Q = self.statistics()
        A = G + self.lam * np.eye(self.M)
        if cho_factor is not None:
            return cho_solve(cho_factor(A, lower=True, check_finite=False), Q, check_finite=False)
        return np.linalg.solve(A, Q)

    def refactor(self, resolve_W: bool = False) -> None:
        """Factor G + lambda I afresh and invert it from the factor (LAPACK potrf + potri,
        O(M^3)); drop the correction chain. ``resolve_W``: also W = A^-1 Q in float64 (bounds
        the drift of the updates). The inverse is kept in float32 when A is well conditioned
        (condition >= (max L_ii / min L_ii)^2 < 1e4), else float64; only its lower triangle is
        stored and A^-1 X is one symmetric matrix product (BLAS symm: reads the M x M matrix
        once, where two triangular solves read it twice)."""
        G, Q = self.statistics()
        A = G + self.lam * np.eye(self.M)
        self._corrections = []
        if lapack is None:  # numpy only: a dense inverse
            self._factor = ("dense", np.linalg.inv(A))
            if resolve_W:
                self.W = self._factor[1] @ Q
                self._spare = 0
            return
        c, lower = cho_factor(A, lower=True, check_finite=False)
        if resolve_W:
            self.W = cho_solve((c, lower), Q, check_finite=False)
            self._spare = 0  # W is a new array: the spare-column buffers are stale
        diag = np.diag(c)
        single = self.solve_dtype == np.float32 and (diag.max() / diag.min()) ** 2 < 1e4
        potri, symm = (lapack.spotri, blas.ssymm) if single else (lapack.dpotri, blas.dsymm)
        inv, info = potri(c.astype(np.float32) if single else c, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"G + lambda I could not be inverted (LAPACK potri info {info})")
        self._factor = (symm, inv)

    def prepare(self) -> None:
        """Factor now if needed (the one-time O(M^3) cost, kept out of the first update)."""
        if self._factor is None:
            self.refactor()

    def _solve(self, X: np.ndarray) -> np.ndarray:
        """A^-1 X for the current A (X: M x k): the refactored inverse minus the corrections."""
        if self._factor is None:
            self.refactor()
        symm, inv = self._factor
        if symm == "dense":
            Y = inv @ X
        else:
            Y = symm(1.0, inv, np.asarray(X, dtype=inv.dtype, order="F"), side=0, lower=1).astype(np.float64)
        for U, SD in self._corrections:
            Y -= U @ (SD @ (U.T @ X))
        return Y

    # ----------------------------------------------------------------- updates
    def add_classes(self, n: int) -> None:
        """Append n empty class columns (their W columns are 0 = A^-1 0); the buffers grow by
        spare columns so that enrolling does not copy Q and W every time."""
        C = self.num_classes
        if self._spare < n:
            grow = max(n, 16)
            self._Qbuf = np.concatenate([self.Q, np.zeros((self.M, grow))], axis=1)
            self._Wbuf = np.concatenate([self.W, np.zeros((self.M, grow))], axis=1)
            self._spare = grow
        self._spare -= n
        self.Q, self.W = self._Qbuf[:, :C + n], self._Wbuf[:, :C + n]

    def drop_classes(self, columns) -> None:
        """Remove class columns (exact: W's columns are independent given A)."""
        keep = np.setdiff1d(np.arange(self.num_classes), np.asarray(columns, dtype=np.int64))
        self.Q, self.W = self.Q[:, keep], self.W[:, keep]
        self._spare = 0

    def update(self, H: np.ndarray, d: np.ndarray, E: np.ndarray) -> None:
        """A += H^T diag(d) H, Q += H^T E; W follows in O(k M^2) (Woodbury, module docstring)."""
        H = np.asarray(H, dtype=np.float64)
        d = np.asarray(d, dtype=np.float64)
        E = np.asarray(E, dtype=np.float64)
        if H.shape[0] == 0:
            return
        U = self._solve(H.T)  # M x k
        S = np.eye(len(d)) + d[:, None] * (H @ U)
        SD = np.linalg.solve(S, np.diag(d))  # S^-1 D
        self.W += U @ np.linalg.solve(S, E - d[:, None] * (H @ self.W))
        cols = np.flatnonzero(E.any(axis=0))  # Q changes only in the enrolled classes' columns
        self.Q[:, cols] += H.T @ E[:, cols]
        self._corrections.append((U, SD))
        self._pending.append((H.astype(np.float32), d))
        self.updates += 1
        if len(self._corrections) >= self.refactor_every:
            self.refactor(resolve_W=True)
