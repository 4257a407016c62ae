"""SAFE's fast-statistics refresh (edgecl.learners.drift) and the temperature fit it sits beside
(edgecl.core.calibration), on generated data with known answers."""

import math

import numpy as np
import torch

from edgecl.core.calibration import fit_temperature, nll
from edgecl.heads import RanPACHead
from edgecl.learners.drift import ClassGaussians, fit_drift_map, refresh

D_FEAT, M = 24, 256


def _classes(n_classes, n, gen):
    """Gaussian classes (rank-4 covariance plus isotropic noise), [n_classes * n, d] and labels."""
    x, y = [], []
    for c in range(n_classes):
        mu = 3 * torch.randn(D_FEAT, generator=gen)
        basis = torch.randn(D_FEAT, 4, generator=gen)
        x.append(mu + torch.randn(n, 4, generator=gen) @ basis.T + 0.3 * torch.randn(n, D_FEAT, generator=gen))
        y.append(torch.full((n,), c))
    return torch.cat(x), torch.cat(y)


def _drift(gen):
    A = torch.eye(D_FEAT) + 0.25 * torch.randn(D_FEAT, D_FEAT, generator=gen) / math.sqrt(D_FEAT)
    return A, 0.5 * torch.randn(D_FEAT, generator=gen)


def test_drift_map_recovers_an_affine_drift_and_is_the_identity_without_one():
    gen = torch.Generator().manual_seed(0)
    x, _ = _classes(4, 200, gen)
    A, b = _drift(gen)
    hold = torch.arange(len(x)) % 5 == 0
    D, c, alpha = fit_drift_map(x, x @ A + b, hold)
    assert torch.allclose(D, A, atol=2e-2) and torch.allclose(c, b, atol=5e-2) and alpha == min(alpha, 1e-1)
    D0, c0, _ = fit_drift_map(x, x.clone(), hold)
    assert torch.equal(D0, torch.eye(D_FEAT)) and not c0.any()


def test_refresh_moves_stale_statistics_towards_the_recomputed_ones():
    """Old classes accumulated under the old features, then the feature space drifts (a known
    affine map); the map fitted on a new session's images only, the refresh brings G and Q much
    closer to what recomputing the old classes' rows from their moved features would give."""
    gen = torch.Generator().manual_seed(1)
    x_old, y_old = _classes(6, 120, gen)
    x_new_session, _ = _classes(2, 150, gen)
    A, b = _drift(gen)
    stale = RanPACHead(D_FEAT, M, seed=3, lambdas=[1.0])
    stale.add(x_old, y_old, torch.arange(len(y_old)) % 5 == 0)
    oracle = RanPACHead(D_FEAT, M, seed=3, lambdas=[1.0])
    oracle.add(x_old @ A + b, y_old, torch.arange(len(y_old)) % 5 == 0)
    gauss = ClassGaussians(D_FEAT, rank=4)
    gauss.add(x_old, y_old, range(6))

    D, c, _ = fit_drift_map(x_new_session, x_new_session @ A + b, torch.arange(300) % 5 == 0)
    refreshed = RanPACHead(D_FEAT, M, seed=3, lambdas=[1.0])
    refreshed.add(x_old, y_old, torch.arange(len(y_old)) % 5 == 0)
    facts = refresh(refreshed, gauss, D, c, range(6), draws=400, seed=0)
    assert facts["classes"] == 6 and facts["mean_shift"] > 0

    def err(head, key):
        return float((getattr(head, key) - getattr(oracle, key)).norm() / getattr(oracle, key).norm())

    for key in ("G", "Q", "G_hold", "Q_hold"):
        assert err(refreshed, key) < 0.25 * err(stale, key), (key, err(refreshed, key), err(stale, key))
    # the Gaussians moved with the map: their means are the moved class means
    want = torch.stack([(x_old[y_old == k] @ A + b).mean(0) for k in range(6)])
    before = torch.stack([x_old[y_old == k].mean(0) for k in range(6)])
    assert (gauss.means - want).norm() < 0.1 * (before - want).norm()


def test_temperature_by_hand_over_sessions_with_different_class_counts():
    # two images right by a margin of 1, one wrong by 1 (NLL minimum at T = 1 / ln 2), split into a
    # 2-class session and a 3-class one whose extra class never competes (logit -1e4)
    a = (np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([0, 0]))
    b = (np.array([[0.0, 1.0, -1e4]]), np.array([0]))
    T = fit_temperature([a[0], b[0]], [a[1], b[1]])
    assert math.isclose(T, 1 / math.log(2), rel_tol=1e-6)
    pooled = [a[0], b[0]], [a[1], b[1]]
    assert nll(*pooled, T) < min(nll(*pooled, 1.05 * T), nll(*pooled, T / 1.05))
    # logits four times larger: a temperature four times larger
    assert math.isclose(fit_temperature([4 * a[0], 4 * b[0]], [a[1], b[1]]), 4 / math.log(2), rel_tol=1e-6)
