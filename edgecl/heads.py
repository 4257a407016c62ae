"""Classifier heads: the cosine head used while PET trains, class prototypes (SimpleCIL), and
the RanPAC head built from additive sufficient statistics G and Q.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import SINGLE


class CosineHead(nn.Module):
    """Cosine classifier: logits = sigma * cos(f, w_c), with a learnable scale sigma.

    Used as the training-time head during PET adaptation (RanPAC, SAFE), as in the papers'
    code (LAMDA-PILOT's CosineLinear). ``extend`` adds rows for a new session's classes.
    """

    def __init__(self, in_features: int, num_classes: int, sigma: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(in_features))
        self.sigma = nn.Parameter(torch.tensor(float(sigma)))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(f, dim=1), F.normalize(self.weight, dim=1))


class Prototypes:
    """Per-class feature sums and counts; SimpleCIL's classifier (Zhou et al. 2023, Sec. 4).

    logits = cos(f, mu_c) with mu_c = sum_c / n_c. Sums and counts are additive, so classes can
    be added in any order and statistics from several devices summed exactly.
    """

    def __init__(self, dim: int):
        self.sums = torch.zeros(0, dim, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)

    @property
    def num_classes(self) -> int:
        return self.sums.shape[0]

    def add(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int = 0, dist=SINGLE) -> None:
        """Add the features' sums and counts per class. Under torchrun each rank passes its part
        of the images and the increments are summed over the ranks (``dist``); ``num_classes``
        makes every rank grow alike whatever labels its part holds."""
        n_cls = max(num_classes, int(labels.max()) + 1 if len(labels) else 0)
        if n_cls > self.num_classes:
            grow = n_cls - self.num_classes
            self.sums = torch.cat([self.sums, self.sums.new_zeros(grow, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow)])
        # one process: into the statistics themselves; several: into increments, summed, then added
        sums, counts = ((torch.zeros_like(self.sums), torch.zeros_like(self.counts)) if dist.active
                        else (self.sums, self.counts))
        sums.index_add_(0, labels, features.double())
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if dist.active:
            dist.sum(sums, counts)
            self.sums += sums
            self.counts += counts

    def means(self) -> torch.Tensor:
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).float()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features.float(), dim=1), F.normalize(self.means(), dim=1))

    def state(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def load_state(self, state: dict) -> None:
        self.sums, self.counts = state["sums"].double(), state["counts"].double()


class RanPACHead:
    """RanPAC head (McDonnell et al., NeurIPS 2023, Sec. 4 / Eq. 3-4).

    h = ReLU(W_rand^T f) with a fixed Gaussian W_rand (d x M, from ``seed``);
    G = sum h h^T, Q = sum h y^T (one-hot y), W = (G + lambda I)^-1 Q, logits = h W.

    The statistics of a held-out share of the training data (G_hold, Q_hold) are kept apart
    while training: lambda is the candidate that minimises the held-out squared error of the
    ridge fit on the remaining data, computed from statistics alone
    (||H W - Y||^2 = tr(W^T G_hold W) - 2 tr(W^T Q_hold) + const). The final W is then
    solved from all the data. No test data is ever involved. With M = 0 the head is plain
    ridge regression on the raw features.
    """

    def __init__(self, dim: int, M: int, seed: int, lambdas: Sequence[float]):
        self.dim, self.M, self.seed = dim, M, seed
        self.lambdas = [float(x) for x in lambdas]
        if M > 0:
            gen = torch.Generator().manual_seed(seed)
            self.W_rand = torch.randn(dim, M, generator=gen)
        else:
            self.W_rand = None
        width = M if M > 0 else dim
        self.G = torch.zeros(width, width, dtype=torch.float64)
        self.Q = torch.zeros(width, 0, dtype=torch.float64)
        self.G_hold = torch.zeros_like(self.G)
        self.Q_hold = torch.zeros_like(self.Q)
        # samples per class (the device's enrollment balances by them), and of them held out
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.counts_hold = torch.zeros(0, dtype=torch.float64)  # training only (not in the bundle)
        self.lam: Optional[float] = None
        self.W: Optional[torch.Tensor] = None

    @property
    def num_classes(self) -> int:
        return self.Q.shape[1]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """h = ReLU(W_rand^T f) (the random-projection layer of RanPAC, Eq. 3)."""
        features = features.float()
        if self.W_rand is None:
            return features
        return F.relu(features @ self.W_rand.to(features.device))

    def _grow(self, num_classes: int) -> None:
        if num_classes > self.num_classes:
            pad = num_classes - self.num_classes
            self.Q = torch.cat([self.Q, self.Q.new_zeros(self.Q.shape[0], pad)], dim=1)
            self.Q_hold = torch.cat([self.Q_hold, self.Q_hold.new_zeros(self.Q.shape[0], pad)], dim=1)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])
            self.counts_hold = torch.cat([self.counts_hold, self.counts_hold.new_zeros(pad)])

    def add(self, features: torch.Tensor, labels: torch.Tensor, holdout: Optional[torch.Tensor] = None,
            chunk: int = 2048, num_classes: int = 0, dist=SINGLE) -> None:
        """Accumulate G and Q (and their held-out parts where ``holdout`` is True). Under torchrun
        each rank passes its part of the images and the increments are summed over the ranks
        (``dist``: the single-process statistics up to float summation order); ``num_classes``
        makes every rank grow alike whatever labels its part holds."""
        self._grow(max(num_classes, int(labels.max()) + 1 if len(labels) else 0))
        # one process: into G, Q themselves (no M x M copies); several: into increments, summed, then added
        stats = (self.G, self.Q, self.G_hold, self.Q_hold)
        dG, dQ, dG_hold, dQ_hold = [torch.zeros_like(t) for t in stats] if dist.active else stats
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).double()
        if holdout is None:
            holdout = torch.zeros(len(labels), dtype=torch.bool)
        counts_hold = torch.bincount(labels.cpu()[holdout.cpu()], minlength=self.num_classes).double()
        for start in range(0, len(labels), chunk):
            sl = slice(start, start + chunk)
            h = self.project(features[sl]).double().cpu()
            y = F.one_hot(labels[sl].cpu(), self.num_classes).double()
            hold = holdout[sl].cpu()
            dG += h.T @ h
            dQ += h.T @ y
            if hold.any():
                dG_hold += h[hold].T @ h[hold]
                dQ_hold += h[hold].T @ y[hold]
        if dist.active:
            dist.sum(dG, dQ, dG_hold, dQ_hold, counts, counts_hold)
            self.G += dG
            self.Q += dQ
            self.G_hold += dG_hold
            self.Q_hold += dQ_hold
        self.counts += counts
        self.counts_hold += counts_hold

    def shift(self, h_old: torch.Tensor, h_new: torch.Tensor, labels: torch.Tensor, per_row: torch.Tensor) -> None:
        """Replace rows' contributions to the statistics: G += sum w h_new h_new^T - w h_old h_old^T,
        Q likewise, with weight ``per_row`` on each row for G, Q and ``per_row`` times the class's
        held-out share for G_hold, Q_hold (SAFE's fast-statistics refresh, edgecl.learners.drift;
        rows with h_new == h_old change nothing, exactly)."""
        labels = labels.cpu()
        share = (self.counts_hold / self.counts.clamp(min=1))[labels]
        y = F.one_hot(labels, self.num_classes).double()
        for w, G, Q in ((per_row.double(), self.G, self.Q), (per_row.double() * share, self.G_hold, self.Q_hold)):
            if not w.any():
                continue
            a, b = h_new.double() * w.sqrt()[:, None], h_old.double() * w.sqrt()[:, None]
            G += a.T @ a - b.T @ b
            Q += (h_new.double() - h_old.double()).mul(w[:, None]).T @ y

    def _fit_without_holdout(self, lam: float) -> Optional[torch.Tensor]:
        """W = (G - G_hold + lambda I)^-1 (Q - Q_hold), float64; None when that matrix is not
        positive definite at this lambda."""
        eye = torch.eye(self.G.shape[0], dtype=self.G.dtype)
        L, info = torch.linalg.cholesky_ex(self.G - self.G_hold + lam * eye)
        return None if info.item() != 0 else torch.cholesky_solve(self.Q - self.Q_hold, L)

    def fit_weights(self) -> torch.Tensor:
        """W of the ridge fit without the held-out rows, at the chosen lambda: the head whose
        logits on those rows are out of sample (what a temperature is fitted on)."""
        lam = self.lam if self.lam is not None else 1.0
        W = self._fit_without_holdout(lam)
        if W is None:
            eye = torch.eye(self.G.shape[0], dtype=self.G.dtype)
            W = torch.linalg.solve(self.G - self.G_hold + lam * eye, self.Q - self.Q_hold)
        return W.float()

    def holdout_error(self, lam: float) -> float:
        """Held-out squared error (up to a constant) of the ridge fit on the non-held-out part."""
        W = self._fit_without_holdout(lam)
        if W is None:  # not positive definite at this lambda: not a usable candidate
            return math.inf
        return float((W * (self.G_hold @ W)).sum() - 2 * (W * self.Q_hold).sum())

    def select_lambda(self, stride: int = 3) -> float:
        """Choose lambda on the held-out statistics (see the class docstring).

        One Cholesky factorisation per candidate tried (a full eigendecomposition, which would
        serve all candidates at once, is many times slower on CPUs). First call: coarse to fine
        over the sorted candidates, every ``stride``-th one, then the neighbours of the best.
        Later calls (next sessions) start from the previous choice and walk to the local
        minimum, trying its neighbours within ``stride - 1`` positions.
        """
        if not self.G_hold.any():
            return self.lam if self.lam is not None else 1.0
        cands = sorted(self.lambdas)
        errors: dict = {}

        def score(indices):
            for i in indices:
                if 0 <= i < len(cands) and i not in errors:
                    errors[i] = self.holdout_error(cands[i])
            return min(errors, key=errors.get)

        if self.lam in cands:
            best = cands.index(self.lam)
        else:
            best = score(sorted(set(range(0, len(cands), stride)) | {len(cands) - 1}))
        while True:
            new_best = score(range(best - stride + 1, best + stride))
            if new_best == best:
                return cands[best]
            best = new_best

    def solve(self, lam: Optional[float] = None, dist=SINGLE) -> None:
        """W = (G + lambda I)^-1 Q over all statistics (Eq. 4), lambda chosen if not given. Under
        torchrun rank 0 chooses and solves, and every rank takes its lambda and W."""
        if dist.main:
            self.lam = self.select_lambda() if lam is None else float(lam)
            eye = torch.eye(self.G.shape[0], dtype=self.G.dtype)
            self.W = torch.linalg.solve(self.G + self.lam * eye, self.Q).float()
        if dist.active:
            self.lam, self.W = dist.broadcast((self.lam, self.W) if dist.main else None)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features) @ self.W.to(features.device)

    def head_tensors(self) -> dict:
        """What the classifier needs (``heads.safetensors``): W, W_rand, lambda."""
        return {k: v for k, v in self.state().items() if k in ("W", "W_rand", "lambda")}

    def stats_tensors(self) -> dict:
        """The sufficient statistics (``stats.safetensors``): G, Q and the per-class counts."""
        return {k: v for k, v in self.state().items() if k in ("G", "Q", "counts")}

    def state(self) -> dict:
        out = {"G": self.G, "Q": self.Q, "counts": self.counts, "W": self.W,
               "lambda": torch.tensor(self.lam, dtype=torch.float64)}
        if self.W_rand is not None:
            out["W_rand"] = self.W_rand
        return out

    def load_state(self, state: dict) -> None:
        self.G, self.Q, self.W = state["G"].double(), state["Q"].double(), state["W"].float()
        self.lam = float(state["lambda"])
        self.counts = (state["counts"].double() if "counts" in state
                       else torch.zeros(self.Q.shape[1], dtype=torch.float64))
        if "W_rand" in state:
            self.W_rand = state["W_rand"].float()
        self.G_hold = torch.zeros_like(self.G)
        self.Q_hold = torch.zeros_like(self.Q)
        self.counts_hold = torch.zeros_like(self.counts)
