"""Classifier alignment (SLCA, Zhang et al., ICCV 2023, Sec. 4.2) in numpy: what the device runs
to re-align an SLCA-family linear head after enrolling a class, and the parts training shares.

numpy only (no torch import): the device imports it. Training (:mod:`edgecl.learners.slca`) runs
the same procedure with torch on its own draws; :func:`adjust_draws` and :func:`head_scales` are
the one implementation of the authors' two heuristics both sides use, and a test checks that
:func:`align` equals the torch alignment on the same draws.

The procedure, one alignment:

- draws: every epoch, ``samples_per_class`` features from N(mu_c, Sigma_c + eps I) for every
  class (:meth:`edgecl.core.classstats.ClassStats.sample`), shuffled, in batches;
- the authors' heuristics on the draws (:func:`adjust_draws`, off unless configured): SLCA's
  code scales the mean of a class of session t_c by 0.9 + 0.1 (t_c + 1) / (T + 1) (T: the last
  session); SLCA++'s code shrinks a draw of session t by 1 / (1 + (mu + 0.02 (u - 0.5)) (T - t)),
  u ~ U(0, 1), and at inference scales session t's head input by 1 + mu (T - t)
  (:func:`head_scales`, folded into the weights since the head is linear);
- softmax regression of every head row on the draws, with logit normalisation
  z = l / (tau ||l||) (``logit_norm: global``, Wei et al. 2022) or the code's session variant
  (||l|| replaced by the mean over sessions of each session block's norm, + 1e-7 each);
- SGD with momentum and weight decay (torch's SGD: buf = m buf + g + wd p, p -= lr buf), lr
  decayed by a cosine over the epochs (lr_e = lr (1 + cos(pi e / E)) / 2).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .formats import AlignmentSpec

__all__ = ["AlignmentSpec", "adjust_draws", "align", "draw_epochs", "head_scales", "mean_factors", "sessions_of"]

EPS = 1e-7  # added to every norm of the logit normalisation (the authors' code)


def sessions_of(blocks) -> np.ndarray:
    """The session index of every class, from the classes per session (``blocks``)."""
    return np.repeat(np.arange(len(blocks)), np.asarray(blocks, dtype=np.int64))


def mean_factors(sessions: np.ndarray, last: int) -> np.ndarray:
    """SLCA's code: the factor on the sampled mean of a class of session t, 0.9 + 0.1 (t + 1) / (T + 1)."""
    return 0.9 + 0.1 * (np.asarray(sessions, np.float64) + 1) / (last + 1)


def head_scales(sessions: np.ndarray, last: int, mu: float) -> np.ndarray:
    """SLCA++'s code (``fc_scale_mu``): the factor on session t's head input, 1 + mu (T - t) (1: off)."""
    return 1.0 + float(mu) * (last - np.asarray(sessions, np.float64))


def adjust_draws(x: np.ndarray, y: np.ndarray, means: np.ndarray, sessions: np.ndarray, last: int,
                 spec: AlignmentSpec, rng: np.random.Generator) -> np.ndarray:
    """The authors' heuristics on draws ``x`` of classes ``y`` (in place; returned): the mean
    scaling (``spec.mean_scale``; ``means[y]`` the classes' means) and the shrinking of old
    sessions' draws (``spec.fc_scale_mu`` > 0; draws one uniform per row from ``rng``).
    ``sessions[y]`` is each class's session, ``last`` the last session."""
    if spec.mean_scale:
        f = mean_factors(sessions[y], last)
        x += ((f - 1.0)[:, None] * means[y]).astype(x.dtype)
    if spec.fc_scale_mu > 0:
        jitter = spec.fc_scale_mu + 0.02 * (rng.random(len(y)) - 0.5)
        x *= (1.0 / (1.0 + jitter * (last - sessions[y])))[:, None].astype(x.dtype)
    return x


def _normalize(logits: np.ndarray, tau: float, blocks=None) -> tuple:
    """(z, norm, dnorm): z = l / (tau norm), norm the global ||l|| + eps, or (``blocks``) the mean
    of the session blocks' norms (+ eps each), and dnorm = d norm / d l (the backward pass reads
    it; the block norms are computed once); z = l and no norm when ``tau`` is 0."""
    if tau <= 0:
        return logits, None, None
    parts = [logits] if blocks is None else np.split(logits, np.cumsum(blocks)[:-1], axis=1)
    raw = [np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    norm = np.mean(raw, axis=0) + EPS
    dnorm = np.concatenate([p / np.where(r > 0, r, np.inf) for p, r in zip(parts, raw)], axis=1) / len(parts)
    return logits / (tau * norm), norm, dnorm


def _grad_logits(logits: np.ndarray, g: np.ndarray, norm, dnorm, tau: float) -> np.ndarray:
    """dL/dl from dL/dz through z = l / (tau norm(l)): g / (tau N) - (sum_j g_j l_j) / (tau N^2) dN/dl."""
    if norm is None:
        return g
    return g / (tau * norm) - np.sum(g * logits, axis=1, keepdims=True) / (tau * norm ** 2) * dnorm


def align(weight: np.ndarray, bias: np.ndarray, blocks, epochs: Iterable, spec: AlignmentSpec) -> tuple:
    """Softmax regression of the linear head (``weight`` [C, d], ``bias`` [C]) on the draws.

    ``epochs`` yields, per epoch, an iterable of batches (x [B, d], y [B]) (labels: head rows);
    ``blocks`` are the classes per session (the session variant of the logit normalisation).
    Returns (weight, bias, mean loss per epoch), float32; the inputs are not modified."""
    W = np.array(weight, dtype=np.float32)
    b = np.array(bias, dtype=np.float32)
    bufs = None
    blk = list(blocks) if spec.logit_norm == "session" else None
    losses = []
    for e, batches in enumerate(epochs):
        lr = np.float32(spec.lr_at(e))
        total, count = 0.0, 0
        for x, y in batches:
            x = np.asarray(x, np.float32)
            y = np.asarray(y, np.int64)
            logits = x @ W.T + b
            z, norm, dnorm = _normalize(logits, spec.tau, blk)
            z = z - z.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            n = len(y)
            total += float(-np.log(np.maximum(p[np.arange(n), y], 1e-45)).sum())
            count += n
            g = p
            g[np.arange(n), y] -= 1.0
            g /= n
            gl = _grad_logits(logits, g, norm, dnorm, spec.tau).astype(np.float32)
            gW = gl.T @ x + np.float32(spec.weight_decay) * W
            gb = gl.sum(0) + np.float32(spec.weight_decay) * b
            if bufs is None:
                bufs = [gW, gb]
            else:
                bufs[0] = np.float32(spec.momentum) * bufs[0] + gW
                bufs[1] = np.float32(spec.momentum) * bufs[1] + gb
            W -= lr * bufs[0]
            b -= lr * bufs[1]
        losses.append(total / max(1, count))
    return W, b, losses


def draw_epochs(stats, classes, sessions: np.ndarray, last: int, spec: AlignmentSpec, rng: np.random.Generator):
    """The device's draws, batch by batch (memory: one batch of features, whatever the number of
    classes): per epoch, ``spec.samples_per_class`` labels per head row shuffled, each batch's
    features drawn from its rows' Gaussians (:meth:`edgecl.core.classstats.ClassStats.draw`),
    then :func:`adjust_draws`. ``classes[j]`` is head row j's class in ``stats``, ``sessions[j]``
    its session. Statistically the training's draws (every class drawn at once, then shuffled),
    with less memory."""
    classes = np.asarray(classes, dtype=np.int64)
    means = stats.mean[classes].astype(np.float32)

    def batches(labels):
        for start in range(0, len(labels), spec.batch_size):
            y = labels[start:start + spec.batch_size]
            yield adjust_draws(stats.draw(classes[y], rng), y, means, sessions, last, spec, rng), y

    for _ in range(spec.epochs):
        yield batches(rng.permutation(np.repeat(np.arange(len(classes)), spec.samples_per_class)))
