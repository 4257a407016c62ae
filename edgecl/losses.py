"""Loss terms and the aggregation rule of SAFE (Zhao et al., "SAFE: Slow and Fast
Parameter-Efficient Tuning for Continual Learning with Pre-Trained Models", NeurIPS 2024), and
at the end the symmetric cross-entropy and logit normalisation of SLCA / SLCA++.

Every function here is pinned to hand-computed values in tests/test_losses.py (SAFE) and
tests/test_slca.py (SLCA / SLCA++).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _standardize_batch(f: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit variance of every feature dimension over the batch."""
    return (f - f.mean(0)) / (f.std(0, unbiased=False) + eps)


def cross_correlation(f_ptm: torch.Tensor, f_slow: torch.Tensor, norm: str = "batch") -> torch.Tensor:
    """SAFE Eq. 1: M_ij = 1/N_b sum_k [phi_ptm(x_k)]_i [phi_slow(x_k)]_j  (d x d).

    ``norm="batch"`` (the paper): each feature dimension standardised over the batch, so M is
    a correlation matrix. ``norm="sample"`` (the authors' public code): each sample's feature
    vector L2-normalised instead.
    """
    if norm == "batch":
        a, b = _standardize_batch(f_ptm), _standardize_batch(f_slow)
    elif norm == "sample":
        a, b = F.normalize(f_ptm, dim=1), F.normalize(f_slow, dim=1)
    else:
        raise ValueError(f"unknown normalisation {norm!r}")
    return a.T @ b / a.shape[0]


def transfer_loss(f_ptm: torch.Tensor, f_slow: torch.Tensor, lambda_diag: float, lambda_rdn: float,
                  norm: str = "batch", reduction: str = "mean") -> dict:
    """SAFE Eq. 2-3, the slow learner's transfer loss from the frozen PTM:

    L_diag = 1/d sum_i (1 - M_ii)^2            (keep each PTM feature: diagonal -> 1)
    L_rdn  = 1/(d(d-1)) sum_{i != j} M_ij^2     (reduce redundancy: off-diagonal -> 0)

    ``reduction="sum"`` drops the 1/d and 1/(d(d-1)) (the authors' code sums both terms, so
    their weights, e.g. 0.01 / 10 for ImageNet-A, are meant for sums). Returns the weighted
    terms ``{"diag": lambda_diag L_diag, "rdn": lambda_rdn L_rdn}``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    M = cross_correlation(f_ptm.float(), f_slow.float(), norm)
    d = M.shape[0]
    diag = torch.diagonal(M)
    l_diag = ((1 - diag) ** 2).sum()
    l_rdn = M.pow(2).sum() - diag.pow(2).sum()
    if reduction == "mean":
        l_diag, l_rdn = l_diag / d, l_rdn / (d * (d - 1))
    return {"diag": lambda_diag * l_diag, "rdn": lambda_rdn * l_rdn}


def cross_classification_loss(fast_head, slow_head, f_fast: torch.Tensor, f_slow: torch.Tensor,
                              y: torch.Tensor, num_old: int) -> torch.Tensor:
    """SAFE Eq. 6, cross-classification between the two learners.

    Slow features (with the slow classifier's old-class rows standing in for old-class
    features, labelled with their classes) are classified by the fast head, and fast features
    (with the fast classifier's old-class rows) by the slow head; the loss is the sum of the
    two cross-entropies. Heads are modules with a ``weight`` of [classes, d] applied to a
    [N, d] input.
    """
    old = torch.arange(num_old, device=y.device)
    targets = torch.cat([old, y])
    slow_in = torch.cat([slow_head.weight[:num_old].detach(), f_slow])
    fast_in = torch.cat([fast_head.weight[:num_old], f_fast])
    return F.cross_entropy(fast_head(slow_in), targets) + F.cross_entropy(slow_head(fast_in), targets)


def feature_alignment_loss(f_fast: torch.Tensor, f_slow: torch.Tensor) -> torch.Tensor:
    """SAFE Eq. 7: mean over the batch of 1 - cos(phi_fast(x), phi_slow(x))."""
    return (1 - F.cosine_similarity(f_fast, f_slow, dim=1)).mean()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1)


def entropy_aggregate(logits_slow: torch.Tensor, logits_fast: torch.Tensor, gamma: float) -> tuple:
    """SAFE Eq. 8-9, entropy-based aggregation at inference.

    H = entropy of each learner's softmax; weights = softmax(-gamma [H_slow, H_fast]) per
    sample; logits = w_slow l_slow + w_fast l_fast. Returns (logits, weights [N, 2]).
    """
    H = torch.stack([entropy(logits_slow), entropy(logits_fast)], dim=1)
    w = torch.softmax(-gamma * H, dim=1)
    return w[:, :1] * logits_slow + w[:, 1:] * logits_fast, w


# --------------------------------------------------------------------------- SLCA / SLCA++
# Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a
# Pre-trained Model", ICCV 2023, and "SLCA++: Unleash the Power of Sequential Fine-tuning for
# Continual Learning with Pre-training", arXiv 2408.08295. Pinned in tests/test_slca.py.


def reverse_cross_entropy(logits: torch.Tensor, y: torch.Tensor, log_zero: float = -4.0,
                          p_min: float = 1e-7) -> torch.Tensor:
    """Reverse cross-entropy (Wang et al., "Symmetric Cross Entropy for Robust Learning with
    Noisy Labels", ICCV 2019, Eq. 3-5): RCE = -sum_k p(k|x) log q(k|x) with q the one-hot label
    and log 0 replaced by ``log_zero`` (the SCE paper's A = -4), i.e. -A (1 - p_y) per sample;
    p is clamped to [``p_min``, 1] as in the SLCA++ code. Mean over the batch."""
    p = torch.softmax(logits.float(), dim=1).clamp(min=p_min, max=1.0)
    log_q = torch.full_like(p, float(log_zero))
    log_q.scatter_(1, y.view(-1, 1), 0.0)
    return -(p * log_q).sum(1).mean()


def symmetric_cross_entropy(logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float,
                            log_zero: float = -4.0) -> dict:
    """SLCA++'s training loss (Sec. 4.2, after SCE): alpha CE + beta RCE. Returns the weighted
    terms ``{"ce": alpha CE, "rce": beta RCE}`` (``rce`` only when beta != 0)."""
    terms = {"ce": alpha * F.cross_entropy(logits, y)}
    if beta:
        terms["rce"] = beta * reverse_cross_entropy(logits, y, log_zero)
    return terms


def logit_normalize(logits: torch.Tensor, tau: float, blocks=None, eps: float = 1e-7) -> torch.Tensor:
    """Logit normalisation of SLCA's classifier alignment (Sec. 4.2; Wei et al., "Mitigating
    Neural Network Overconfidence with Logit Normalization", ICML 2022): l / (tau ||l||).

    ``blocks`` (sizes of consecutive class groups, one per session) selects the authors' code's
    variant: ||l|| is replaced by the mean over sessions of each session block's norm
    ||l_block|| (+ ``eps`` each). Without ``blocks``: the paper's global norm (+ ``eps``)."""
    if blocks is None:
        norm = logits.norm(p=2, dim=1, keepdim=True) + eps
    else:
        parts = torch.split(logits, list(blocks), dim=1)
        norm = torch.cat([b.norm(p=2, dim=1, keepdim=True) + eps for b in parts], dim=1).mean(1, keepdim=True)
    return logits / norm / tau
