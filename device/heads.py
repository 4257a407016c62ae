"""Classifier heads in numpy, torch-free (the device runtime and ``edgecl eval ENGINE_DIR``).

The exported graph outputs one feature vector per learner; the heads stay outside the graph
because enrollment changes them. Two kinds, matching :mod:`edgecl.heads`:

* ``ranpac``: logits = ReLU(f @ W_rand) @ W  (W_rand d x M, W M x C; plain ridge if no W_rand)
* ``prototypes`` (SimpleCIL): logits = cos(f, sums_c / counts_c)
* ``linear`` (SLCA / SLCA++, the aligned per-session heads): logits = f @ weight.T + bias

SAFE-style aggregation of several learners' logits (entropy-weighted) is :func:`aggregate`.
"""

from __future__ import annotations

import numpy as np


def project(features: np.ndarray, W_rand) -> np.ndarray:
    """h = ReLU(W_rand^T f) (RanPAC Eq. 3), float32; plain ridge on f when W_rand is None."""
    f = np.asarray(features, dtype=np.float32)
    return f if W_rand is None else np.maximum(f @ np.asarray(W_rand, dtype=np.float32), 0.0)


def ranpac_logits(features: np.ndarray, W: np.ndarray, W_rand=None) -> np.ndarray:
    return project(features, W_rand) @ np.asarray(W, dtype=np.float32)


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def prototype_logits(features: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    means = (np.asarray(sums, dtype=np.float64) / np.maximum(np.asarray(counts, dtype=np.float64), 1)[:, None])
    return _l2n(np.asarray(features, dtype=np.float32)) @ _l2n(means.astype(np.float32)).T


class Head:
    """One learner's head: ``kind`` and its tensors (numpy, names without the learner prefix)."""

    def __init__(self, kind: str, tensors: dict):
        self.kind, self.tensors = kind, tensors
        if kind == "ranpac":
            self.W = np.asarray(tensors["ranpac.W"], dtype=np.float32)
            self.W_rand = tensors.get("ranpac.W_rand")
            if self.W_rand is not None:
                self.W_rand = np.asarray(self.W_rand, dtype=np.float32)
        elif kind == "prototypes":
            self.sums, self.counts = tensors["prototypes.sums"], tensors["prototypes.counts"]
        elif kind == "linear":
            self.weight = np.asarray(tensors["linear.weight"], dtype=np.float32)
            self.bias = np.asarray(tensors["linear.bias"], dtype=np.float32) if "linear.bias" in tensors else None
        else:
            raise ValueError(f"unknown head kind {kind!r}")

    @property
    def num_classes(self) -> int:
        if self.kind == "ranpac":
            return int(self.W.shape[1])
        return int((self.weight if self.kind == "linear" else self.sums).shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        if self.kind == "ranpac":
            return ranpac_logits(features, self.W, self.W_rand)
        if self.kind == "linear":
            out = np.asarray(features, dtype=np.float32) @ self.weight.T
            return out if self.bias is None else out + self.bias
        return prototype_logits(features, self.sums, self.counts)


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


def predict(logits: dict, aggregation: dict | None, return_weights: bool = False):
    """What the engine directory predicts (its manifest's ``aggregation``): SAFE's entropy
    aggregate (``predict: aggregate``, gamma from the manifest) or one learner alone
    (``predict: slow`` / ``fast``, as the bundle's ``safe.inference`` said); a single learner's
    logits unchanged. The weights are returned either way (for the loop's JSON lines)."""
    agg = aggregation or {}
    out, w = aggregate(logits, float(agg.get("gamma", 1.0)), return_weights=True)
    which = agg.get("predict", "aggregate")
    if which != "aggregate" and which in logits:
        out = logits[which]
    return (out, w) if return_weights else out
