"""Unknown rejection and calibrated confidence on the device (docs/DEVICE.md, "Unknown rejection").

A camera mostly sees things that are none of the engine's classes. The device scores every
prediction with a rejection score (higher = more like a known class) and calls the frame
``unknown`` below a threshold; it also reports a confidence that means what it says.

* Scores (:data:`SCORES`, one registry; ``python -m benchmarks open_set`` measured them on held-out
  training images of classes an engine never saw, and chose :data:`DEFAULT_SCORE`):
  ``msp`` (maximum softmax probability at the fitted temperature; Hendrycks & Gimpel, ICLR 2017),
  ``energy`` (T logsumexp(z / T); Liu et al., NeurIPS 2020), ``maxlogit`` (Hendrycks et al., ICML
  2022), all on the logits the engine predicts (SAFE: the aggregate), and ``mahalanobis``
  (:func:`mahalanobis`: Lee et al., NeurIPS 2018, with class means Q_c / n_c and the shared
  within-class covariance from the ridge head's statistics G, Q, counts, in compact form).
* Calibration (:func:`calibrate`, run by ``edgecl export`` on held-out *training* images of the
  engine's classes, never val): the temperature T by negative log-likelihood
  (:func:`fit_temperature`; Guo et al., ICML 2017) and a two-parameter logistic map of the
  top softmax probability's log-odds (:func:`fit_platt`; Platt, 1999) fitted to whether the
  prediction was right: the reported confidence is ``sigmoid(a logit(p_T) + b)``.
* The threshold (:class:`OpenSet`): the score that ``accept_rate`` of the held-out known images
  reach under the heads *as they are now*. The engine directory keeps those images' features
  (``openset.safetensors``), so after every enrollment, rename or removal the threshold is
  recomputed from them through the current heads: classes added on the device raise the top
  score of known images (more candidates), and the threshold follows, so the acceptance of
  known images stays at the rate the user chose. Images of a removed engine class drop out.
  An enrolled class has no held-out images: its logits are calibrated onto the engine classes'
  (edgecl.device.heads.ranpac), and its images are assumed to score like theirs (measured:
  docs/DEVICE.md).

Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from edgecl.core.calibration import fit_temperature  # noqa: F401 (the device's T, same as training's)
from edgecl.core.errors import EdgeclError

from .heads.aggregate import softmax as _softmax

DEFAULT_ACCEPT_RATE = 0.95
FILE = "openset.safetensors"


# ----------------------------------------------------------------------------- scores

def softmax(z: np.ndarray, T: float = 1.0) -> np.ndarray:
    """softmax(z / T) over the classes, in float64."""
    return _softmax(np.asarray(z, np.float64) / T, 1)


def logsumexp(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(1)
    return m + np.log(np.exp(z - m[:, None]).sum(1))


def msp(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """Maximum softmax probability at temperature T."""
    return softmax(logits, T).max(1)


def energy(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """Negative free energy T logsumexp(z / T) (higher = known)."""
    return T * logsumexp(np.asarray(logits, np.float64) / T)


def maxlogit(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """The largest logit (T plays no part)."""
    return np.asarray(logits, np.float64).max(1)


SCORES: dict = {"msp": msp, "energy": energy, "maxlogit": maxlogit}
# chosen by python -m benchmarks open_set on held-out training images (docs/DEVICE.md, "Unknown rejection")
DEFAULT_SCORE = "maxlogit"


def score_fn(name: str) -> Callable:
    try:
        return SCORES[name]
    except KeyError:
        raise EdgeclError(f"rejection score {name!r} is not one the device computes ({', '.join(SCORES)}); "
                          f"re-export the engine with this edgecl") from None


@dataclass
class CompactCovariance:
    """A covariance as its ``k`` leading eigenpairs (U [M, k], ``eig`` [k]) and the mean of the
    remaining eigenvalues (``rest``): Sigma ~ U diag(eig) U^T + rest (I - U U^T)."""

    U: np.ndarray
    eig: np.ndarray
    rest: float

    def distances(self, h: np.ndarray, means: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of every row of ``h`` [N, M] to every mean [C, M]: [N, C],
        O(N M (C + k)) (||r||^2 / rest + sum_i (u_i^T r)^2 (1 / eig_i - 1 / rest), r = h - mu)."""
        h, means = np.asarray(h, np.float64), np.asarray(means, np.float64)
        sq = (h ** 2).sum(1)[:, None] - 2 * h @ means.T + (means ** 2).sum(1)[None]
        ph, pm = h @ self.U, means @ self.U
        w = 1.0 / self.eig - 1.0 / self.rest
        proj = ((ph ** 2) @ w)[:, None] - 2 * (ph * w) @ pm.T + ((pm ** 2) @ w)[None]
        return np.maximum(sq / self.rest + proj, 0.0)


def shared_covariance(G: np.ndarray, Q: np.ndarray, counts: np.ndarray, k: int) -> tuple:
    """(class means [C, M], :class:`CompactCovariance`) from a ridge head's statistics: with
    one-hot targets Q_c = sum of class c's rows, so mu_c = Q_c / n_c and the pooled within-class
    covariance is (G - sum_c n_c mu_c mu_c^T) / (N - C)."""
    G, Q = np.asarray(G, np.float64), np.asarray(Q, np.float64)
    n = np.maximum(np.asarray(counts, np.float64), 1.0)
    means = (Q / n).T
    S = (G - (Q / n) @ Q.T) / max(float(n.sum()) - Q.shape[1], 1.0)
    eig, U = np.linalg.eigh((S + S.T) / 2)
    eig, U = eig[::-1], U[:, ::-1]
    k = int(min(k, len(eig) - 1))
    rest = float(max(eig[k:].mean(), 1e-12))
    return means, CompactCovariance(U[:, :k].copy(), np.maximum(eig[:k], rest), rest)


def mahalanobis(h: np.ndarray, means: np.ndarray, cov: CompactCovariance) -> np.ndarray:
    """Minus the smallest squared Mahalanobis distance to a class mean (higher = known)."""
    return -cov.distances(h, means).min(1)


# ----------------------------------------------------------------------------- calibration

def _log_odds(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_platt(confidence: np.ndarray, correct: np.ndarray, l2: float = 1e-4) -> tuple:
    """(a, b) of P(correct) = sigmoid(a logit(confidence) + b) by Newton's method on the
    (slightly L2-regularised) log-loss (Platt, 1999)."""
    x = _log_odds(confidence)
    t = np.asarray(correct, np.float64)
    X = np.stack([x, np.ones_like(x)], 1)
    w = np.array([1.0, 0.0])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        g = X.T @ (p - t) / len(t) + l2 * w
        H = (X * (p * (1 - p))[:, None]).T @ X / len(t) + l2 * np.eye(2)
        step = np.linalg.solve(H, g)
        w = w - step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def confidence(logits: np.ndarray, T: float = 1.0, platt=(1.0, 0.0)) -> np.ndarray:
    """The reported confidence of the top class: sigmoid(a logit(p_T) + b), p_T = max softmax(z / T)."""
    a, b = platt
    return 1.0 / (1.0 + np.exp(-(a * _log_odds(msp(logits, T)) + b)))


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over equal-width confidence bins of |accuracy - confidence|
    weighted by the bin's share of the images (Guo et al., 2017; the bins of :func:`reliability`)."""
    n = max(len(conf), 1)
    return float(sum(k / n * abs(acc - c) for _, _, k, c, acc in reliability(conf, correct, bins) if k))


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> list:
    """Per bin (i/B, (i+1)/B]: (lower edge, upper edge, images, mean confidence, accuracy)."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        out.append((b / bins, (b + 1) / bins, int(m.sum()), float(conf[m].mean()) if m.any() else None,
                    float(correct[m].mean()) if m.any() else None))
    return out


# ----------------------------------------------------------------------------- thresholds and metrics

def threshold_for(scores: np.ndarray, accept_rate: float) -> float:
    """The largest threshold t with at least ``accept_rate`` of ``scores`` >= t."""
    s = np.sort(np.asarray(scores, np.float64))[::-1]
    if len(s) == 0:
        raise EdgeclError("no held-out scores to set the threshold from")
    check_accept_rate(accept_rate)
    return float(s[max(math.ceil(accept_rate * len(s) - 1e-9), 1) - 1])


def check_accept_rate(rate: float, what: str = "--accept-rate") -> float:
    if not (isinstance(rate, (int, float)) and 0.0 < float(rate) <= 1.0):
        raise EdgeclError(f"{what} {rate!r}: give the share of known-class images to accept, in (0, 1], e.g. 0.95")
    return float(rate)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known (positive) from unknown images by the score:
    the probability that a known image scores above an unknown one (ties count half)."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    allv = np.concatenate([known, unknown])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sv = allv[order]
    i = 0
    while i < len(sv):  # average ranks over ties
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rk = ranks[:len(known)].sum()
    return float((rk - len(known) * (len(known) + 1) / 2) / (len(known) * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of unknown images accepted at the threshold that accepts ``tpr`` of the known."""
    return float((np.asarray(unknown) >= threshold_for(known, tpr)).mean())


# ----------------------------------------------------------------------------- the device's judge

@dataclass
class Calibration:
    """What ``edgecl export`` fitted (the engine manifest's ``open_set``,
    :class:`edgecl.core.formats.OpenSetCalibration`) with the held-out features it kept."""

    score: str
    accept_rate: float
    temperature: float
    platt: tuple
    features: dict  # {learner: float16 [N, d]} graph outputs of the held-out images
    labels: np.ndarray  # [N] engine class index of each


def calibrate(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Temperature and confidence map fitted on held-out known images' logits (the engine's
    prediction): ``{"temperature", "platt"}``."""
    T = fit_temperature(logits, labels)
    correct = np.asarray(logits).argmax(1) == np.asarray(labels)
    return {"temperature": T, "platt": list(fit_platt(msp(logits, T), correct))}


class OpenSet:
    """The rejection threshold of the heads as they are now and the judgement of each prediction.

    ``predict(inputs) -> final logits`` is the runtime's prediction over the current classes from
    what ``to_inputs(features)`` made of the held-out features (the heads' input rows, computed
    once: RanPAC's projection is the costly part); ``state_key()`` changes with every enrollment,
    rename, removal or reload (the threshold is cached until it does); ``base_of()`` maps the
    current classes to engine class indices."""

    def __init__(self, calib: Calibration, predict: Callable, state_key: Callable, base_of: Callable,
                 accept_rate: Optional[float] = None, unknown_below: Optional[float] = None,
                 to_inputs: Callable = lambda feats: feats):
        self.calib = calib
        self.predict = predict
        self.to_inputs = to_inputs
        self._inputs: Optional[dict] = None
        self.state_key = state_key
        self.base_of = base_of
        self.accept_rate = check_accept_rate(accept_rate if accept_rate is not None else calib.accept_rate)
        self.unknown_below = unknown_below  # an expert's raw threshold on the score: overrides the fitted one
        self._cache: dict = {}
        self.score = score_fn(calib.score)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return self.score(logits, self.calib.temperature)

    def remaining(self) -> np.ndarray:
        """Which held-out images belong to an engine class the store still serves (boolean [N])."""
        return np.isin(self.calib.labels, [b for b in self.base_of() if b is not None])

    def held_out_scores(self) -> np.ndarray:
        """The chosen score of every held-out image of a remaining engine class, under the current
        heads (empty when every engine class was removed)."""
        key = self.state_key()
        if key not in self._cache:
            keep = self.remaining()
            if not keep.any():
                self._cache = {key: np.zeros(0)}
                return self._cache[key]
            if self._inputs is None:
                self._inputs = self.to_inputs({ln: np.asarray(f, np.float32) for ln, f in self.calib.features.items()})
            self._cache = {key: self.scores(self.predict({n: v[keep] for n, v in self._inputs.items()}))}
        return self._cache[key]

    def threshold(self, accept_rate: Optional[float] = None) -> float:
        """The score a frame must reach to be called known; -inf (nothing rejected) when no engine
        class is left to hold images out for (every one removed: only enrolled classes remain)."""
        if self.unknown_below is not None:
            return float(self.unknown_below)
        rate = self.accept_rate if accept_rate is None else check_accept_rate(accept_rate)
        held = self.held_out_scores()
        return threshold_for(held, rate) if len(held) else float("-inf")

    def judge(self, logits: np.ndarray) -> dict:
        """``{"score", "confidence", "known", "threshold"}`` per row of the final logits."""
        s = self.scores(logits)
        t = self.threshold()
        return {"score": s, "confidence": confidence(logits, self.calib.temperature, self.calib.platt),
                "known": s >= t, "threshold": t}
