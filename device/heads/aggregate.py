"""SAFE's entropy-based aggregation (Zhao et al., NeurIPS 2024, Sec. 4.3), numpy."""

from __future__ import annotations

import numpy as np


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def entropy_weights(logits: dict, gamma: float = 1.0) -> np.ndarray:
    """SAFE's aggregation weights (Sec. 4.3): softmax(-gamma * [H_1, H_2, ...]) per row, H the
    entropy of softmax(logits); [N, learners]."""
    ent = []
    for lg in logits.values():
        p = softmax(np.asarray(lg, np.float64), 1)
        ent.append(-(p * np.log(np.clip(p, 1e-12, None))).sum(1))
    return softmax(-gamma * np.stack(ent, 1), 1)


def aggregate(logits: dict, gamma: float = 1.0, return_weights: bool = False):
    """Entropy-weighted aggregation (SAFE): w = softmax(-gamma * H_i), logits = sum w_i l_i.
    A single learner's logits are returned unchanged (weights None)."""
    names = list(logits)
    if len(names) == 1:
        out, w = logits[names[0]], None
    else:
        w = entropy_weights(logits, gamma)
        out = sum(w[:, i:i + 1] * logits[n] for i, n in enumerate(names)).astype(np.float32)
    return (out, w) if return_weights else out


def predict(logits: dict, aggregation, return_weights: bool = False):
    """What the engine directory predicts (its manifest's ``aggregation``,
    :class:`edgecl.core.formats.Aggregation` or None): SAFE's entropy aggregate (``predict:
    aggregate``, gamma from the manifest) or one learner alone (``predict: slow`` / ``fast``, as
    the bundle's ``safe.inference`` said); a single learner's logits unchanged. The weights are
    returned either way (for the loop's JSON lines)."""
    gamma = aggregation.gamma if aggregation is not None else 1.0
    which = aggregation.predict if aggregation is not None else "aggregate"
    out, w = aggregate(logits, float(gamma), return_weights=True)
    if which != "aggregate" and which in logits:
        out = logits[which]
    return (out, w) if return_weights else out
