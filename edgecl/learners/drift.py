"""SAFE's fast-head statistics, refreshed as the fast learner moves (issue 16; no published SAFE
code does this: theirs keeps G_f, Q_f as accumulated).

The fast learner's RanPAC head holds G_f = sum h h^T and Q_f = sum h y^T over every session's
features, each computed under the fast weights *of its session*; the fast learner then moves on
and those rows go stale. Old images are not kept, so the rows cannot be recomputed. Instead:

1. Each seen class keeps a Gaussian of its fast features (:class:`ClassGaussians`: mean, a
   rank-r factor of its scatter and an isotropic residual, i.e. probabilistic PCA), taken from
   real features when the class is learned.
2. After a fast session, the drift of the fast space is fitted on the session's own images,
   which are seen before and after the training: an affine map ``f_after ~ f_before D + b``
   (:func:`fit_drift_map`, ridge towards the identity, its strength chosen on the session's
   held-out rows).
3. Each old class's contribution is corrected by the map (:func:`refresh`): with the same
   standard-normal draws z, x_old = mu + z-part (the class as it was) and x_new = x_old D + b;
   G_f += sum w (h(x_new) h(x_new)^T - h(x_old) h(x_old)^T), Q_f likewise, w = n_c / draws, and
   the Gaussian moves with the map. A learner that has not moved gives D = I, b = 0 and changes
   nothing, exactly; the real-feature rows stay in G_f and only the drift is modelled, which is
   a control variate: what a Gaussian misses about the class cancels in the difference.
"""

from __future__ import annotations

import math

import torch

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strengths, times mean(diag(X^T X))


class ClassGaussians:
    """Per-class N(mu, F F^T + s^2 I) in a feature space that moves: ``F`` is the top-``rank``
    factor of the class's sample covariance, ``s^2`` the mean variance left over. Float32."""

    def __init__(self, dim: int, rank: int):
        self.dim, self.rank = dim, rank
        self.means = torch.zeros(0, dim)
        self.factors = torch.zeros(0, dim, rank)
        self.resid = torch.zeros(0)

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def add(self, features: torch.Tensor, labels: torch.Tensor, classes) -> None:
        """Append the classes ``classes`` (consecutive new ids) from their real features."""
        for c in classes:
            if c != self.num_classes:
                raise ValueError(f"class {c} added out of order (have {self.num_classes})")
            x = features[labels == c].double()
            n = len(x)
            mu = x.mean(0)
            xc = x - mu
            if n > 1:
                _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
                var = sv ** 2 / (n - 1)
                k = min(self.rank, len(var))
                factor = torch.zeros(self.dim, self.rank, dtype=torch.float64)
                factor[:, :k] = vt[:k].T * var[:k].sqrt()
                rest = float(var[k:].sum()) / max(self.dim - k, 1)
            else:
                factor, rest = torch.zeros(self.dim, self.rank, dtype=torch.float64), 0.0
            self.means = torch.cat([self.means, mu.float()[None]])
            self.factors = torch.cat([self.factors, factor.float()[None]])
            self.resid = torch.cat([self.resid, torch.tensor([rest], dtype=torch.float32)])

    def draw(self, c: int, z_low: torch.Tensor, z_iso: torch.Tensor) -> torch.Tensor:
        """Draws of class c from standard normals z_low [n, rank] and z_iso [n, dim]."""
        return self.means[c] + z_low @ self.factors[c].T + math.sqrt(float(self.resid[c])) * z_iso

    def move(self, D: torch.Tensor, b: torch.Tensor, classes) -> None:
        """Push the classes through x -> x D + b. The residual stays isotropic: its variance is
        scaled by mean(diag(D^T D)) (exact when D is a scaled rotation)."""
        idx = torch.as_tensor(list(classes), dtype=torch.long)
        if len(idx) == 0:
            return
        self.means[idx] = self.means[idx] @ D + b
        self.factors[idx] = D.T @ self.factors[idx]
        self.resid[idx] = self.resid[idx] * float((D * D).sum()) / self.dim


def fit_drift_map(before: torch.Tensor, after: torch.Tensor, hold: torch.Tensor) -> tuple:
    """(D [d, d], b [d], alpha): the affine map with ``after ~ before D + b`` on one session's
    images, by ridge regression of the displacement ``after - before`` on ``before`` (penalty
    alpha ||D - I||^2, so the identity is the default), alpha chosen from :data:`ALPHAS` by the
    error on the ``hold`` rows of the fit on the others, then refitted on all rows. No movement
    (after == before) gives exactly D = I, b = 0."""
    X, R = before.double(), (after - before).double()
    d = X.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    if not R.any():
        return eye.float(), torch.zeros(d), 0.0

    def solve(rows, alpha):
        x, r = X[rows], R[rows]
        xm, rm = x.mean(0), r.mean(0)
        xc = x - xm
        gram = xc.T @ xc
        W = torch.linalg.solve(gram + alpha * float(gram.diagonal().mean()) * eye, xc.T @ (r - rm))
        return W, rm - xm @ W

    fit_rows = ~hold
    if hold.any() and fit_rows.sum() > 1:
        errors = []
        for a in ALPHAS:
            W, c = solve(fit_rows, a)
            errors.append(float(((X[hold] @ W + c - R[hold]) ** 2).sum()))
        alpha = ALPHAS[min(range(len(ALPHAS)), key=errors.__getitem__)]
    else:
        alpha = 1.0
    W, c = solve(torch.ones(len(X), dtype=torch.bool), alpha)
    return (eye + W).float(), c.float(), alpha


@torch.no_grad()
def refresh(head, gaussians: ClassGaussians, D: torch.Tensor, b: torch.Tensor, classes, draws: int,
            seed: int, chunk: int = 16) -> dict:
    """Correct ``head``'s (a :class:`edgecl.heads.RanPACHead`) statistics of ``classes`` for the
    map x -> x D + b and move their Gaussians (module docstring, step 3). Returns facts for the
    training history: the mean shift of the class means relative to their norm."""
    classes = list(classes)
    if not classes:
        return {"classes": 0}
    gen = torch.Generator().manual_seed(seed)
    shift = []
    for start in range(0, len(classes), chunk):
        part = classes[start:start + chunk]
        x_old, labels, weights = [], [], []
        for c in part:
            z_low = torch.randn(draws, gaussians.rank, generator=gen)
            z_iso = torch.randn(draws, gaussians.dim, generator=gen)
            x_old.append(gaussians.draw(c, z_low, z_iso))
            labels.append(torch.full((draws,), c, dtype=torch.long))
            weights.append(torch.full((draws,), float(head.counts[c]) / draws, dtype=torch.float64))
        x_old = torch.cat(x_old)
        x_new = x_old @ D + b
        head.shift(head.project(x_old), head.project(x_new), torch.cat(labels), torch.cat(weights))
        mu = gaussians.means[torch.as_tensor(part)]
        shift.append(((mu @ D + b - mu).norm(dim=1) / mu.norm(dim=1).clamp(min=1e-12)))
    gaussians.move(D, b, classes)
    return {"classes": len(classes), "mean_shift": round(float(torch.cat(shift).mean()), 5)}
