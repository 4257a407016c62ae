"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017), numpy
only: shared by training (SAFE's per-learner temperatures, fitted on held-out training images)
and the device (the open-set confidence, edgecl.device.openset)."""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np

from .errors import EdgeclError

Logits = Union[np.ndarray, Sequence[np.ndarray]]


def _groups(logits: Logits, labels) -> list:
    if isinstance(logits, np.ndarray):
        logits, labels = [logits], [labels]
    return [(np.asarray(z, np.float64), np.asarray(y, np.int64)) for z, y in zip(logits, labels) if len(z)]


def fit_temperature(logits: Logits, labels) -> float:
    """The temperature T minimising the negative log-likelihood of ``labels`` under softmax(z / T).

    ``logits`` is one [N, C] array, or a list of arrays whose class counts may differ (SAFE pools
    the held-out rows of every session, each scored over the classes seen in its session), with
    ``labels`` alike; every row weighs the same. NLL is convex in beta = 1 / T with derivative
    mean(E_p[z] - z_y), which grows with beta: bisection on log beta to that derivative's zero.
    """
    groups = _groups(logits, labels)
    n = sum(len(z) for z, _ in groups)
    if n == 0:
        raise EdgeclError("no held-out images to fit the temperature on")
    scale = float(np.concatenate([z.ravel() for z, _ in groups]).std()) or 1.0

    def grad(beta):
        total = 0.0
        for z, y in groups:
            s = z * beta
            p = np.exp(s - s.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            total += float(((p * z).sum(1) - z[np.arange(len(z)), y]).sum())
        return total / n

    lo, hi = math.log(1e-4 / scale), math.log(1e4 / scale)
    if grad(math.exp(hi)) <= 0:  # separable: the likelihood grows without bound; the sharpest allowed
        return float(1.0 / math.exp(hi))
    if grad(math.exp(lo)) >= 0:
        return float(1.0 / math.exp(lo))
    for _ in range(100):
        mid = (lo + hi) / 2
        if grad(math.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return float(1.0 / math.exp((lo + hi) / 2))


def nll(logits: Logits, labels, T: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(z / T) (the quantity
    :func:`fit_temperature` minimises)."""
    groups = _groups(logits, labels)
    total, n = 0.0, 0
    for z, y in groups:
        s = z / T
        m = s.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(s - m).sum(1))
        total += float((lse - s[np.arange(len(s)), y]).sum())
        n += len(z)
    return total / max(n, 1)
