"""SAFE's loss terms and aggregation pinned to hand-computed values."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from edgecl.losses import (
    cross_classification_loss,
    cross_correlation,
    entropy,
    entropy_aggregate,
    feature_alignment_loss,
    transfer_loss,
)


def test_cross_correlation_batch_standardised_by_hand():
    # columns standardised over the batch: ptm -> [[-1, 1], [1, -1]], slow -> [[1, 0], [-1, 0]]
    f_ptm = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    f_slow = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    M = cross_correlation(f_ptm, f_slow, "batch")
    assert torch.allclose(M, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-4)
    terms = transfer_loss(f_ptm, f_slow, lambda_diag=2.0, lambda_rdn=10.0)
    # L_diag = ((1 - -1)^2 + (1 - 0)^2) / 2 = 2.5 ; L_rdn = (0^2 + 1^2) / (2 * 1) = 0.5
    assert terms["diag"].item() == pytest.approx(2.0 * 2.5, abs=1e-3)
    assert terms["rdn"].item() == pytest.approx(10.0 * 0.5, abs=1e-3)


def test_cross_correlation_sample_normalised_by_hand():
    f_ptm = torch.tensor([[3.0, 4.0], [1.0, 0.0]])   # rows -> [0.6, 0.8], [1, 0]
    f_slow = torch.tensor([[0.0, 2.0], [1.0, 0.0]])  # rows -> [0, 1], [1, 0]
    M = cross_correlation(f_ptm, f_slow, "sample")
    # M = (a^T b) / 2 = ([[0.6*0 + 1*1, 0.6*1 + 0], [0.8*0 + 0, 0.8*1 + 0]]) / 2
    assert torch.allclose(M, torch.tensor([[0.5, 0.3], [0.0, 0.4]]))


def test_transfer_loss_zero_when_slow_equals_decorrelated_ptm():
    f = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # uncorrelated columns
    terms = transfer_loss(f, f, 1.0, 1.0)
    assert terms["diag"].item() == pytest.approx(0.0, abs=1e-4)
    assert terms["rdn"].item() == pytest.approx(0.0, abs=1e-8)


def test_feature_alignment_by_hand():
    f_fast = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    f_slow = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    assert feature_alignment_loss(f_fast, f_slow).item() == pytest.approx(0.5)  # cos = 1 and 0


def _linear(rows):
    head = nn.Linear(2, len(rows), bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(rows))
    return head


def test_cross_classification_by_hand():
    fast_head = _linear([[1.0, 0.0], [0.0, 1.0]])
    slow_head = _linear([[2.0, 0.0], [0.0, 1.0]])
    f_fast = torch.tensor([[0.0, 1.0]])
    f_slow = torch.tensor([[1.0, 1.0]])
    y = torch.tensor([1])
    loss = cross_classification_loss(fast_head, slow_head, f_fast, f_slow, y, num_old=1)

    def ce(logits, target):
        return -logits[target] + math.log(sum(math.exp(v) for v in logits))

    # fast head on [slow row 0 = (2, 0) -> class 0 ; slow feature (1, 1) -> class 1]
    a = ce([2.0, 0.0], 0) + ce([1.0, 1.0], 1)
    # slow head on [fast row 0 = (1, 0) -> class 0 ; fast feature (0, 1) -> class 1]
    b = ce([2.0, 0.0], 0) + ce([0.0, 1.0], 1)
    assert loss.item() == pytest.approx(a / 2 + b / 2, rel=1e-6)


def test_entropy_aggregation_formula():
    l_slow = torch.tensor([[0.0, 0.0]])
    l_fast = torch.tensor([[3.0, 0.0]])
    p = 1 / (1 + math.exp(-3))
    h_fast = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    h_slow = math.log(2)
    assert entropy(l_fast).item() == pytest.approx(h_fast, rel=1e-6)
    gamma = 2.0
    w_slow = math.exp(-gamma * h_slow) / (math.exp(-gamma * h_slow) + math.exp(-gamma * h_fast))
    logits, w = entropy_aggregate(l_slow, l_fast, gamma)
    assert w[0, 0].item() == pytest.approx(w_slow, rel=1e-6)
    assert w[0, 1].item() == pytest.approx(1 - w_slow, rel=1e-6)
    assert torch.allclose(logits, torch.tensor([[(1 - w_slow) * 3.0, 0.0]]))
    # gamma = 0: plain average
    logits0, w0 = entropy_aggregate(l_slow, l_fast, 0.0)
    assert torch.allclose(w0, torch.tensor([[0.5, 0.5]])) and torch.allclose(logits0, (l_slow + l_fast) / 2)


def test_device_numpy_aggregation_matches_training_formula():
    from edgecl.device.heads import aggregate

    g = torch.Generator().manual_seed(0)
    l_slow, l_fast = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    ref, _ = entropy_aggregate(l_slow, l_fast, gamma=1.5)
    got = aggregate({"slow": l_slow.numpy(), "fast": l_fast.numpy()}, gamma=1.5)
    assert np.allclose(got, ref.numpy(), atol=1e-5)
