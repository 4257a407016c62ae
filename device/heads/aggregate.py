"""SAFE's entropy-based aggregation (Zhao et al., NeurIPS 2024, Sec. 4.3), numpy."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _scaled(logits: dict, temperatures) -> dict:
    """Each learner's logits over its temperature (``temperatures`` by learner name; absent: 1)."""
    temperatures = temperatures or {}
    return {n: np.asarray(lg, np.float32) / np.float32(temperatures.get(n, 1.0)) for n, lg in logits.items()}


def entropy_weights(logits: dict, gamma: float = 1.0, temperatures=None) -> np.ndarray:
    """SAFE's aggregation weights (Sec. 4.3): softmax(-gamma * [H_1, H_2, ...]) per row, H the
    entropy of softmax(logits / T) with each learner's temperature T; [N, learners]."""
    ent = []
    for lg in _scaled(logits, temperatures).values():
        p = softmax(np.asarray(lg, np.float64), 1)
        ent.append(-(p * np.log(np.clip(p, 1e-12, None))).sum(1))
    return softmax(-gamma * np.stack(ent, 1), 1)


def aggregate(logits: dict, gamma: float = 1.0, return_weights: bool = False, temperatures=None):
    """Entropy-weighted aggregation (SAFE): z_i = l_i / T_i, w = softmax(-gamma * H(z_i)),
    logits = sum w_i z_i, as training's :meth:`edgecl.learners.safe.SAFE.aggregate`.
    A single learner's logits are returned unchanged (weights None)."""
    names = list(logits)
    if len(names) == 1:
        out, w = logits[names[0]], None
    else:
        scaled = _scaled(logits, temperatures)
        w = entropy_weights(scaled, gamma)
        out = sum(w[:, i:i + 1] * scaled[n] for i, n in enumerate(names)).astype(np.float32)
    return (out, w) if return_weights else out


def predict(logits: dict, aggregation, return_weights: bool = False):
    """What the engine directory predicts (its manifest's ``aggregation``,
    :class:`edgecl.core.formats.Aggregation` or None): SAFE's entropy aggregate (``predict:
    aggregate``, gamma and the learners' temperatures from the manifest) or one learner alone
    (``predict: slow`` / ``fast``, as the bundle's ``safe.inference`` said); a single learner's
    logits unchanged. The weights are returned either way (for the loop's JSON lines)."""
    gamma = aggregation.gamma if aggregation is not None else 1.0
    which = aggregation.predict if aggregation is not None else "aggregate"
    temperatures = aggregation.temperatures if aggregation is not None else None
    out, w = aggregate(logits, float(gamma), return_weights=True, temperatures=temperatures)
    if which != "aggregate" and which in logits:
        out = logits[which]
    return (out, w) if return_weights else out
