"""edgecl.device.ranpac: the RidgeHead's rank-k updates and downdates against a fresh solve
(float64, float32, numpy without scipy), the periodic refactor, class counts estimated from
the statistics."""

import numpy as np
import pytest


@pytest.mark.parametrize("solve_dtype", [np.float64, np.float32, "numpy-only"])
def test_rank_k_updates_equal_a_fresh_solve(solve_dtype, monkeypatch):
    from edgecl.device import ranpac
    from edgecl.device.ranpac import RidgeHead

    if solve_dtype == "numpy-only":  # a device image without scipy
        monkeypatch.setattr(ranpac, "lapack", None)
        solve_dtype = np.float64

    rng = np.random.RandomState(0)
    M, C = 48, 5
    H0 = np.maximum(rng.randn(300, M), 0)
    G, Q = H0.T @ H0, H0.T @ np.eye(C)[rng.randint(0, C, 300)]
    head = RidgeHead(G, Q, lam=3.0, refactor_every=100, solve_dtype=solve_dtype)
    ref_G, ref_Q = G.copy(), Q.copy()
    for step in range(6):
        if step % 2 == 0:
            head.add_classes(1)
            ref_Q = np.concatenate([ref_Q, np.zeros((M, 1))], 1)
        k = 7 + step
        H = np.maximum(rng.randn(k, M), 0)
        d = rng.uniform(0.5, 3.0, k) * (-0.2 if step == 5 else 1.0)  # the last one downdates
        E = np.zeros((k, head.num_classes))
        E[:, -1] = rng.uniform(0.5, 2, k)
        head.update(H, d, E)
        if ranpac.lapack is not None:
            assert head._factor[1].dtype == solve_dtype  # the float32 path is the one exercised
        ref_G += H.T @ (d[:, None] * H)
        ref_Q += H.T @ E
        fresh = np.linalg.solve(ref_G + 3.0 * np.eye(M), ref_Q)
        tol = 1e-9 if solve_dtype == np.float64 else 2e-4
        assert np.abs(head.W - fresh).max() <= tol * np.abs(fresh).max(), step
    G_got, Q_got = head.statistics()
    np.testing.assert_allclose(G_got, ref_G, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(Q_got, ref_Q, rtol=1e-9)
    head.drop_classes([1])
    np.testing.assert_allclose(head.W, np.delete(fresh, 1, axis=1), atol=2e-4 * np.abs(fresh).max())


def test_periodic_refactor_bounds_the_correction_chain():
    from edgecl.device.ranpac import RidgeHead

    rng = np.random.RandomState(1)
    H0 = np.maximum(rng.randn(100, 16), 0)
    head = RidgeHead(H0.T @ H0, H0.T @ np.ones((100, 2)), lam=1.0, refactor_every=3)
    for _step in range(7):
        head.add_classes(1)  # also: the spare-column buffers stay consistent across refactors
        H = np.maximum(rng.randn(4, 16), 0)
        head.update(H, np.ones(4), rng.rand(4, head.num_classes))
        assert len(head._corrections) < 3
        np.testing.assert_allclose(head.W, head.solve_fresh(), rtol=1e-4, atol=1e-6)
    assert head.num_classes == 9


def test_class_counts_estimate_from_statistics():
    from edgecl.device.ranpac import estimate_class_counts

    rng = np.random.RandomState(0)
    d, M = 64, 2048
    W_rand = rng.randn(d, M)
    counts = np.array([100, 100, 50, 20])
    F = np.concatenate([rng.randn(n, d) * 0.3 + rng.randn(d) for c, n in enumerate(counts)])  # similar norms
    H = np.maximum(F @ W_rand, 0)
    y = np.repeat(np.arange(4), counts)
    est = estimate_class_counts(H.T @ H, H.T @ np.eye(4)[y], M)
    assert np.abs(est / counts - 1).max() < 0.15, est
