"""Per-class feature statistics: the Gaussian class model of SLCA's classifier alignment
(Zhang et al., ICCV 2023, Sec. 4.2; SLCA++ arXiv 2408.08295, Sec. 4), shared with the device.

numpy only, no torch import anywhere in this module: the device runtime (numpy, OpenCV and
an inference backend) imports it to enroll classes by updating statistics, with no
backpropagation there.

Each seen class c is modelled as N(mu_c, Sigma_c). What is stored per class depends on the
covariance *form*:

=========  =======================================================  ===========================
form       stored                                                   Sigma_c
=========  =======================================================  ===========================
full       count n, mean mu, centred scatter M2 (d x d)             M2 / (n - 1)
diag       count, mean, diagonal of M2 (d)                          diag(M2) / (n - 1)
lowrank    count, mean, factor F (d x r), residual diagonal R (d)   (F F^T + diag(R)) / (n - 1)
shared     count, mean; one pooled within-class scatter (d x d)     sum_c M2_c / (N - C)
=========  =======================================================  ===========================

Statistics are kept as count, mean and *centred* second moment M2 = sum (x - mu)(x - mu)^T
rather than raw sums of x x^T: the two carry the same information, but the centred form merges
exactly with Chan et al.'s parallel update (M2 = M2_a + M2_b + n_a n_b / n delta delta^T) and
keeps its precision in float32 on a device. Internally everything is float64.

Merging (``add`` of a new batch, ``merge`` of two objects) is exact for ``full``, ``diag`` and
``shared``. For ``lowrank`` the merged scatter [F_a, F_b, sqrt(n_a n_b / n) delta] is
re-truncated to rank r by an SVD and the discarded energy moves into R, so the *diagonal* of
the scatter stays exact and the low-rank part is the best rank-r approximation of what the two
parts held (exactly the top-r eigenpairs when a class arrives in one batch).

Sampling adds ``eps`` I to every covariance (the authors' code adds 1e-4 I), which keeps the
Cholesky factor of a rank-deficient scatter (n < d) defined.
"""

from __future__ import annotations

import numpy as np

FORMS = ("full", "diag", "lowrank", "shared")


class ClassStatsError(ValueError):
    """Bad use of :class:`ClassStats` (unknown form, wrong shape, incompatible merge)."""


class ClassStats:
    """Per-class count, mean and covariance in one of :data:`FORMS` (see the module docstring).

    ``dim``: feature size d; ``rank``: r of the ``lowrank`` form; ``eps``: ridge added to every
    covariance when sampling. Class ids are integers 0 .. num_classes - 1; a class that has
    never been added has count 0 and is skipped by :meth:`sample`.
    """

    def __init__(self, dim: int, form: str = "full", rank: int = 16, eps: float = 1e-4):
        if form not in FORMS:
            raise ClassStatsError(f"unknown covariance form {form!r}; choose one of {', '.join(FORMS)}")
        if int(dim) < 1:
            raise ClassStatsError(f"feature dimension must be >= 1, got {dim}")
        if form == "lowrank" and int(rank) < 1:
            raise ClassStatsError(f"lowrank form needs rank >= 1, got {rank}")
        self.dim, self.form, self.rank, self.eps = int(dim), form, int(rank), float(eps)
        self.count = np.zeros(0, dtype=np.float64)
        self.mean = np.zeros((0, self.dim), dtype=np.float64)
        self.m2: list = []       # full: [d, d] per class; diag: [d] per class
        self.factor: list = []   # lowrank: [d, r] per class
        self.resid: list = []    # lowrank: [d] per class
        self.pooled = np.zeros((self.dim, self.dim), dtype=np.float64) if form == "shared" else None
        self._chol: dict = {}    # sampling factors by class (and "shared"), dropped when that class changes

    # ------------------------------------------------------------------ bookkeeping
    @property
    def num_classes(self) -> int:
        return len(self.count)

    def _grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        d, r = self.dim, self.rank
        self.count = np.concatenate([self.count, np.zeros(extra)])
        self.mean = np.concatenate([self.mean, np.zeros((extra, d))])
        for _ in range(extra):
            if self.form == "full":
                self.m2.append(np.zeros((d, d)))
            elif self.form == "diag":
                self.m2.append(np.zeros(d))
            elif self.form == "lowrank":
                self.factor.append(np.zeros((d, r)))
                self.resid.append(np.zeros(d))

    # ------------------------------------------------------------------ accumulation
    def add(self, features, labels) -> None:
        """Accumulate a batch: ``features`` [N, d] (any float array), ``labels`` [N] ints."""
        x = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels).astype(np.int64).reshape(-1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ClassStatsError(f"features must be [N, {self.dim}], got shape {tuple(x.shape)}")
        if len(y) != len(x):
            raise ClassStatsError(f"{len(x)} feature rows but {len(y)} labels")
        if len(y) == 0:
            return
        if y.min() < 0:
            raise ClassStatsError(f"labels must be >= 0, got {int(y.min())}")
        if not np.isfinite(x).all():
            raise ClassStatsError("features contain NaN or inf; refusing to corrupt the statistics")
        self._grow(int(y.max()) + 1)
        for c in np.unique(y):
            xc = x[y == c]
            mu = xc.mean(0)
            centred = xc - mu
            if self.form in ("full", "shared"):
                part = centred.T @ centred
            elif self.form == "diag":
                part = (centred ** 2).sum(0)
            else:
                part = _lowrank_of_rows(centred, self.rank)
            self._merge_class(int(c), float(len(xc)), mu, part)

    def _merge_class(self, c: int, n_b: float, mu_b: np.ndarray, part) -> None:
        """Chan et al.'s parallel update of class c with (n_b, mu_b, M2_b in this form)."""
        n_a, mu_a = self.count[c], self.mean[c].copy()
        n = n_a + n_b
        delta = mu_b - mu_a
        w = n_a * n_b / n
        if self.form == "full":
            self.m2[c] = self.m2[c] + part + w * np.outer(delta, delta)
        elif self.form == "diag":
            self.m2[c] = self.m2[c] + part + w * delta ** 2
        elif self.form == "shared":
            self.pooled += part + w * np.outer(delta, delta)
        else:
            F_b, R_b = part
            G = np.concatenate([self.factor[c], F_b, np.sqrt(w) * delta[:, None]], axis=1)
            F = _top_factor(G, self.rank)
            self.resid[c] = self.resid[c] + R_b + (G ** 2).sum(1) - (F ** 2).sum(1)
            self.factor[c] = F
        self.mean[c] = mu_a + delta * (n_b / n)
        self.count[c] = n
        self._chol.pop(c, None)
        self._chol.pop("shared", None)

    def borrow_scatter(self, c: int, source: ClassStats, k: int) -> None:
        """Pool class k's scatter (of ``source``, same form) into class c around c's own mean: c's
        covariance becomes (M2_c + M2_k) / (n_c + n_k - 1), its mean unchanged. A class seen in a
        few samples borrows the spread of its nearest well-sampled class (distribution calibration,
        Yang et al., ICLR 2021, with one neighbour). Nothing to do in the shared form."""
        if source.form != self.form:
            raise ClassStatsError(f"borrow_scatter needs the same form ({self.form}), got {source.form}")
        k = source._check_class(k)
        if self.form == "shared":
            return
        part = (source.factor[k], source.resid[k]) if self.form == "lowrank" else source.m2[k]
        self._merge_class(self._check_class(c), float(source.count[k]), self.mean[c].copy(), part)

    def merge(self, other: ClassStats) -> ClassStats:
        """A new object holding the statistics of both (as if every sample had been added to
        one). Exact for full / diag / shared; lowrank: see the module docstring."""
        if not isinstance(other, ClassStats):
            raise ClassStatsError(f"can only merge ClassStats, got {type(other).__name__}")
        if (other.form, other.dim) != (self.form, self.dim) or (self.form == "lowrank" and other.rank != self.rank):
            raise ClassStatsError(f"cannot merge {other.form} (d={other.dim}, r={other.rank}) statistics into "
                                  f"{self.form} (d={self.dim}, r={self.rank}); convert one of them first")
        out = self.copy()
        out._grow(other.num_classes)
        if self.form == "shared":
            out.pooled = out.pooled + other.pooled  # the within-class scatter of each side...
        for c in np.where(other.count > 0)[0]:
            if self.form == "full" or self.form == "diag":
                part = other.m2[c]
            elif self.form == "lowrank":
                part = (other.factor[c], other.resid[c])
            else:
                part = np.zeros((self.dim, self.dim))  # ...plus, per class, the mean-shift term
            out._merge_class(int(c), float(other.count[c]), other.mean[c], part)
        return out

    def copy(self) -> ClassStats:
        out = ClassStats(self.dim, self.form, self.rank, self.eps)
        out.count, out.mean = self.count.copy(), self.mean.copy()
        out.m2 = [a.copy() for a in self.m2]
        out.factor = [a.copy() for a in self.factor]
        out.resid = [a.copy() for a in self.resid]
        out.pooled = None if self.pooled is None else self.pooled.copy()
        out._chol = dict(self._chol)  # sampling factors shared until a class changes (never written in place)
        return out

    # ------------------------------------------------------------------ the model
    def seen(self) -> np.ndarray:
        """Ids of the classes with at least one sample."""
        return np.where(self.count > 0)[0]

    def means(self) -> np.ndarray:
        """[num_classes, d] class means (zeros for unseen classes)."""
        return self.mean.copy()

    def _dof(self, c: int) -> float:
        return max(self.count[c] - 1.0, 1.0)

    def covariance(self, c: int) -> np.ndarray:
        """Sigma_c as a dense [d, d] matrix (unbiased; without the sampling ``eps``)."""
        c = self._check_class(c)
        if self.form == "full":
            return self.m2[c] / self._dof(c)
        if self.form == "diag":
            return np.diag(self.m2[c] / self._dof(c))
        if self.form == "lowrank":
            F = self.factor[c]
            return (F @ F.T + np.diag(self.resid[c])) / self._dof(c)
        return self.shared_covariance()

    def variance(self, c: int) -> np.ndarray:
        """diag(Sigma_c), exact in every form."""
        c = self._check_class(c)
        if self.form == "full":
            return np.diag(self.m2[c]) / self._dof(c)
        if self.form == "diag":
            return self.m2[c] / self._dof(c)
        if self.form == "lowrank":
            return ((self.factor[c] ** 2).sum(1) + self.resid[c]) / self._dof(c)
        return np.diag(self.shared_covariance())

    def shared_covariance(self) -> np.ndarray:
        """The pooled within-class covariance sum_c M2_c / (N - C) (``shared`` form only)."""
        if self.form != "shared":
            raise ClassStatsError(f"shared_covariance() needs the shared form, this is {self.form}")
        k = len(self.seen())
        return self.pooled / max(self.count.sum() - k, 1.0)

    def _check_class(self, c) -> int:
        c = int(c)
        if not 0 <= c < self.num_classes or self.count[c] == 0:
            raise ClassStatsError(f"class {c} has no statistics (known: {self.seen().tolist()})")
        return c

    def _cholesky(self, key) -> np.ndarray:
        """Lower Cholesky factor (float32) of Sigma + eps I for a class id or "shared", cached."""
        if key not in self._chol:
            cov = self.shared_covariance() if key == "shared" else self.covariance(key)
            self._chol[key] = np.linalg.cholesky(cov + self.eps * np.eye(self.dim)).astype(np.float32)
        return self._chol[key]

    def _scales(self, c: int):
        """The float32 sampling factors of class c, cached like the Cholesky factors: diag: the
        standard deviations sqrt(M2 / (n - 1) + eps); lowrank: (F^T / sqrt(n - 1), sqrt(R / (n - 1) + eps))."""
        if c not in self._chol:
            dof = self._dof(c)
            if self.form == "diag":
                self._chol[c] = np.sqrt(self.m2[c] / dof + self.eps).astype(np.float32)
            else:
                self._chol[c] = (np.ascontiguousarray((self.factor[c] * (1.0 / np.sqrt(dof))).T, np.float32),
                                 np.sqrt(self.resid[c] / dof + self.eps).astype(np.float32))
        return self._chol[c]

    def _transform(self, c: int, z: np.ndarray, z_low) -> np.ndarray:
        """Standard normals ``z`` [n, d] (and ``z_low`` [n, r], lowrank) -> n float32 draws of class c."""
        if self.form in ("full", "shared"):
            x = z @ self._cholesky(c if self.form == "full" else "shared").T
        elif self.form == "diag":
            x = z * self._scales(c)
        else:
            low, diag = self._scales(c)
            x = z_low @ low
            x += z * diag
        return x + self.mean[c].astype(np.float32)

    def sample(self, n_per_class: int, rng: np.random.Generator, classes=None,
               dtype=np.float32) -> tuple:
        """Draw ``n_per_class`` features from N(mu_c, Sigma_c + eps I) for every seen class (or
        the given ``classes``). Returns (features [K * n, d] of ``dtype``, labels [K * n])."""
        classes = self.seen() if classes is None else np.asarray([self._check_class(c) for c in classes])
        n, d = int(n_per_class), self.dim
        feats = np.empty((len(classes) * n, d), dtype=dtype)
        for i, c in enumerate(classes):
            z = rng.standard_normal((n, d)).astype(np.float32)
            z_low = rng.standard_normal((n, self.rank)).astype(np.float32) if self.form == "lowrank" else None
            feats[i * n:(i + 1) * n] = self._transform(int(c), z, z_low)
        return feats, np.repeat(np.asarray(classes, dtype=np.int64), n)

    def draw(self, labels, rng: np.random.Generator) -> np.ndarray:
        """One float32 feature from N(mu_c, Sigma_c + eps I) per entry of ``labels`` (any order,
        classes repeated): the normals drawn in one go, each class's rows transformed together
        (what the device's alignment draws batch by batch)."""
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        z = rng.standard_normal((len(y), self.dim), dtype=np.float32)
        z_low = rng.standard_normal((len(y), self.rank), dtype=np.float32) if self.form == "lowrank" else None
        x = np.empty_like(z)
        for c in np.unique(y):
            sel = np.flatnonzero(y == c)
            x[sel] = self._transform(self._check_class(c), z[sel], None if z_low is None else z_low[sel])
        return x

    # ------------------------------------------------------------------ size and conversion
    def bytes_per_class(self, itemsize: int = 4) -> int:
        """Bytes one class occupies in :meth:`state` at ``itemsize`` (4: float32): count, mean
        and the form's covariance part. ``shared`` adds :meth:`shared_bytes` once in total."""
        d, r = self.dim, self.rank
        per = {"full": 1 + d + d * d, "diag": 1 + 2 * d, "lowrank": 1 + 2 * d + d * r, "shared": 1 + d}[self.form]
        return per * itemsize

    def shared_bytes(self, itemsize: int = 4) -> int:
        """Bytes stored once for all classes (the pooled scatter of ``shared``; else 0)."""
        return self.dim * self.dim * itemsize if self.form == "shared" else 0

    def convert(self, form: str, rank: int | None = None) -> ClassStats:
        """The same statistics in another form, where that is derivable exactly: from ``full``
        to any form (lowrank: the top-r eigenpairs of each M2, the rest of its diagonal in R),
        from ``lowrank`` to ``diag``, and any form to itself."""
        rank = self.rank if rank is None else int(rank)
        if form == self.form and (form != "lowrank" or rank == self.rank):
            return self.copy()
        ok = self.form == "full" or (self.form == "lowrank" and form == "diag")
        if form not in FORMS or not ok:
            raise ClassStatsError(f"cannot derive {form!r} statistics from {self.form!r} ones; keep full "
                                  f"statistics while training (slca.cov_form: full) to export any form")
        out = ClassStats(self.dim, form, rank, self.eps)
        out._grow(self.num_classes)
        out.count, out.mean = self.count.copy(), self.mean.copy()
        for c in self.seen():
            if form == "diag":
                out.m2[c] = self.variance(c) * self._dof(c)
            elif form == "full":  # pragma: no cover - handled by the copy above
                out.m2[c] = self.m2[c].copy()
            elif form == "shared":
                out.pooled += self.m2[c]
            else:
                F = _top_eigen_factor(self.m2[c], rank, int(self.count[c]) - 1, seed=int(c))
                out.factor[c], out.resid[c] = F, np.diag(self.m2[c]) - (F ** 2).sum(1)
        return out

    # ------------------------------------------------------------------ persistence
    def state(self, dtype=np.float32) -> dict:
        """numpy arrays for a safetensors file: ``count`` [C], ``mean`` [C, d] and the form's
        parts (full: ``m2`` [C, d, d]; diag: ``m2`` [C, d]; lowrank: ``factor`` [C, d, r] and
        ``resid`` [C, d]; shared: ``pooled`` [d, d]); ``form`` (index into :data:`FORMS`),
        ``rank`` and ``eps`` as 1-element arrays, so :meth:`from_state` needs nothing else."""
        out = {"count": self.count.astype(dtype), "mean": self.mean.astype(dtype),
               "form": np.array([FORMS.index(self.form)], dtype=np.int32),
               "rank": np.array([self.rank], dtype=np.int32), "eps": np.array([self.eps], dtype=np.float64)}
        C, d, r = self.num_classes, self.dim, self.rank
        if self.form == "full":
            out["m2"] = np.stack(self.m2).astype(dtype) if C else np.zeros((0, d, d), dtype)
        elif self.form == "diag":
            out["m2"] = np.stack(self.m2).astype(dtype) if C else np.zeros((0, d), dtype)
        elif self.form == "lowrank":
            out["factor"] = np.stack(self.factor).astype(dtype) if C else np.zeros((0, d, r), dtype)
            out["resid"] = np.stack(self.resid).astype(dtype) if C else np.zeros((0, d), dtype)
        else:
            out["pooled"] = self.pooled.astype(dtype)
        return out

    @classmethod
    def from_state(cls, state: dict) -> ClassStats:
        """Rebuild from :meth:`state` (arrays may be numpy or anything ``np.asarray`` takes)."""
        try:
            form = FORMS[int(np.asarray(state["form"]).reshape(-1)[0])]
            rank = int(np.asarray(state["rank"]).reshape(-1)[0])
            eps = float(np.asarray(state["eps"]).reshape(-1)[0])
            mean = np.asarray(state["mean"], dtype=np.float64)
            count = np.asarray(state["count"], dtype=np.float64).reshape(-1)
        except (KeyError, IndexError) as exc:
            raise ClassStatsError(f"class statistics are incomplete or damaged: {exc}") from None
        if mean.ndim != 2 or len(count) != len(mean):
            raise ClassStatsError(f"class statistics: mean {mean.shape} does not match count {count.shape}")
        out = cls(mean.shape[1], form, rank, eps)
        out.count, out.mean = count, mean
        try:
            if form in ("full", "diag"):
                out.m2 = [a for a in np.asarray(state["m2"], dtype=np.float64)]
            elif form == "lowrank":
                out.factor = [a for a in np.asarray(state["factor"], dtype=np.float64)]
                out.resid = [a for a in np.asarray(state["resid"], dtype=np.float64)]
            else:
                out.pooled = np.asarray(state["pooled"], dtype=np.float64)
        except KeyError as exc:
            raise ClassStatsError(f"{form} class statistics lack {exc}") from None
        n_parts = len(out.m2) if form in ("full", "diag") else len(out.factor) if form == "lowrank" else len(count)
        if n_parts != len(count):
            raise ClassStatsError(f"class statistics: {n_parts} covariance parts for {len(count)} classes")
        return out


def _top_factor(G: np.ndarray, rank: int) -> np.ndarray:
    """F (d x rank) with F F^T the best rank-``rank`` approximation of G G^T."""
    U, s, _ = np.linalg.svd(G, full_matrices=False)
    F = U[:, :rank] * s[:rank]
    if F.shape[1] < rank:
        F = np.concatenate([F, np.zeros((G.shape[0], rank - F.shape[1]))], axis=1)
    return F


def _top_eigen_factor(M: np.ndarray, rank: int, rank_bound: int, seed: int = 0) -> np.ndarray:
    """F (d x rank) = top-``rank`` eigenvectors of the PSD matrix M scaled by sqrt(eigenvalue).

    A class scatter from n samples has rank at most ``rank_bound`` = n - 1. When that is well
    below d, M Omega for a random d x (rank_bound + 8) Omega spans M's whole range, so the
    eigenpairs of M restricted to that orthonormal basis are M's own (exact up to rounding; one
    extra power iteration for numerical safety) at a fraction of a full ``eigh``'s cost
    (d = 1280, n = 100: ~50 ms against ~1 s). Otherwise a full ``eigh``."""
    d = M.shape[0]
    k = max(rank, rank_bound) + 8
    if 2 * k >= d:
        vals, vecs = np.linalg.eigh(M)
    else:
        Q = np.random.default_rng(seed).standard_normal((d, k))
        for _ in range(2):
            Q, _r = np.linalg.qr(M @ Q)
        vals, small = np.linalg.eigh(Q.T @ M @ Q)
        vecs = Q @ small
    top = np.argsort(vals)[::-1][:rank]
    F = vecs[:, top] * np.sqrt(np.clip(vals[top], 0, None))
    if F.shape[1] < rank:
        F = np.concatenate([F, np.zeros((d, rank - F.shape[1]))], 1)
    return F


def _lowrank_of_rows(centred: np.ndarray, rank: int) -> tuple:
    """(F, R) of one batch's centred rows X: F F^T = best rank-r part of X^T X, R the rest of
    its diagonal."""
    F = _top_factor(centred.T, rank)
    return F, (centred ** 2).sum(0) - (F ** 2).sum(1)
