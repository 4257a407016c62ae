import numpy as np
import pytest
import torch

from edgecl.heads import CosineHead, Prototypes, RanPACHead
from edgecl.metrics import SessionMetrics, forgetting, summarize


def _blobs(n_cls=4, n=60, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_cls, d, generator=g) * 3
    y = torch.arange(n_cls).repeat_interleave(n)
    x = centers[y] + torch.randn(len(y), d, generator=g)
    return x, y


def test_ranpac_statistics_match_definition():
    x, y = _blobs()
    head = RanPACHead(16, 32, seed=1, lambdas=[1.0])
    head.add(x, y)
    h = torch.relu(x @ head.W_rand).double()
    Y = torch.nn.functional.one_hot(y).double()
    assert torch.allclose(head.G, h.T @ h)
    assert torch.allclose(head.Q, h.T @ Y)
    assert head.counts.tolist() == torch.bincount(y).double().tolist()  # samples per class, for the device
    head.solve(lam=1.0)
    W = torch.linalg.solve(h.T @ h + torch.eye(32, dtype=torch.float64), h.T @ Y)
    assert torch.allclose(head.W.double(), W, atol=1e-4)


def test_ranpac_statistics_are_additive_in_any_order():
    x, y = _blobs()
    a = RanPACHead(16, 32, seed=1, lambdas=[1.0])
    b = RanPACHead(16, 32, seed=1, lambdas=[1.0])
    a.add(x, y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    for part in order.chunk(3):  # classes arrive in another order and in pieces
        b.add(x[part], y[part])
    assert torch.allclose(a.G, b.G) and torch.allclose(a.Q, b.Q)


def test_ranpac_lambda_uses_holdout_and_classifies():
    x, y = _blobs(n=80)
    head = RanPACHead(16, 64, seed=0, lambdas=[1e-8, 1e-2, 1.0, 1e2, 1e12])
    hold = torch.zeros(len(y), dtype=torch.bool)
    hold[::5] = True
    head.add(x, y, hold)
    head.solve()
    assert head.lam not in (1e12,)  # a huge lambda shrinks W to ~0: the held-out error rules it out
    acc = (head.logits(x).argmax(1) == y).float().mean()
    assert acc > 0.95


def test_ridge_without_projection():
    x, y = _blobs()
    head = RanPACHead(16, 0, seed=0, lambdas=[1.0])
    head.add(x, y)
    head.solve(lam=1.0)
    assert head.W.shape == (16, 4)


def test_prototypes_cosine_logits():
    p = Prototypes(2)
    p.add(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0, 1]))
    assert torch.allclose(p.means(), torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    logits = p.logits(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(logits, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


def test_cosine_head_scale():
    h = CosineHead(3, 2, sigma=10.0)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
    assert torch.allclose(h(torch.tensor([[2.0, 0, 0]])), torch.tensor([[10.0, 0.0]]))


def test_metrics_hand_computed():
    # session 0: classes 0,1 ; session 1: classes 2,3
    session_of = np.array([0, 0, 1, 1])
    m = SessionMetrics()
    assert m.record(np.array([0, 1, 0, 1]), np.array([0, 1, 0, 1]), session_of) == 100.0
    acc = m.record(np.array([0, 0, 2, 3, 2, 2]), np.array([0, 1, 2, 3, 0, 1]), session_of)
    assert acc == pytest.approx(100 * 3 / 6)
    assert m.matrix[1] == [pytest.approx(25.0), pytest.approx(100.0)]
    s = m.summary()
    assert s["A_last"] == pytest.approx(50.0) and s["A_avg"] == pytest.approx(75.0)
    assert s["forgetting"] == pytest.approx(75.0)


def test_forgetting_uses_best_earlier_accuracy():
    matrix = [[80.0], [90.0, 70.0], [60.0, 50.0, 40.0]]
    # class-set 0: best 90 -> 60 (30); class-set 1: best 70 -> 50 (20)
    assert forgetting(matrix) == pytest.approx(25.0)
    assert summarize([80.0], [[80.0]])["forgetting"] == 0.0


def test_coarse_to_fine_lambda_matches_exhaustive_search():
    x, y = _blobs(n_cls=6, n=50, d=24, seed=4)
    head = RanPACHead(24, 96, seed=2, lambdas=[10.0 ** e for e in range(-8, 15)])
    hold = torch.zeros(len(y), dtype=torch.bool)
    hold[1::4] = True
    head.add(x, y, hold)
    errors = {lam: head.holdout_error(lam) for lam in head.lambdas}
    assert head.select_lambda() == min(errors, key=errors.get)


def test_lambda_search_warm_starts_from_previous_choice():
    x, y = _blobs(n_cls=6, n=50, d=24, seed=5)
    head = RanPACHead(24, 96, seed=2, lambdas=[10.0 ** e for e in range(-8, 15)])
    hold = torch.zeros(len(y), dtype=torch.bool)
    hold[::4] = True
    head.add(x, y, hold)
    errors = {lam: head.holdout_error(lam) for lam in head.lambdas}
    head.lam = 1e14  # a previous session's choice far from the optimum: the walk still gets there
    assert head.select_lambda() == min(errors, key=errors.get)
