"""Class statistics (edgecl/core/classstats.py): the Gaussian sampler's mean and covariance per form,
exact merging, the low-rank reconstruction, conversions, the state round trip, and that the
module stays importable without torch (the device imports it)."""

import subprocess
import sys

import numpy as np
import pytest

from edgecl.core.classstats import FORMS, ClassStats, ClassStatsError


def _data(n_per_class=400, d=6, classes=3, seed=0):
    """Gaussian classes with known, distinct, correlated covariances (rank-2 structure + noise)."""
    rng = np.random.default_rng(seed)
    xs, ys, truth = [], [], []
    for c in range(classes):
        A = rng.normal(size=(d, 2)) * (1 + c)
        cov = A @ A.T + 0.1 * np.eye(d)
        mu = rng.normal(size=d) * 3
        xs.append(rng.multivariate_normal(mu, cov, size=n_per_class))
        ys.append(np.full(n_per_class, c))
        truth.append((mu, cov))
    return np.concatenate(xs), np.concatenate(ys), truth


def _empirical(x):
    return x.mean(0), np.cov(x.T)


@pytest.mark.parametrize("form", FORMS)
def test_sampler_matches_the_stored_gaussian(form):
    x, y, _ = _data()
    stats = ClassStats(6, form, rank=2, eps=0.0)
    stats.add(x, y)
    feats, labels = stats.sample(20000, np.random.default_rng(1))
    assert feats.dtype == np.float32 and feats.shape == (60000, 6)
    assert np.array_equal(np.bincount(labels), [20000] * 3)
    for c in range(3):
        mu, cov = _empirical(feats[labels == c].astype(np.float64))
        target = stats.covariance(c)
        scale = np.sqrt(np.diag(target))
        assert np.allclose(mu, stats.means()[c], atol=0.05 * scale.max())
        # relative error of every covariance entry against the stored covariance's scale
        assert np.abs(cov - target).max() < 0.05 * np.outer(scale, scale).max(), form


@pytest.mark.parametrize("form", FORMS)
def test_draw_for_given_labels_matches_the_stored_gaussian(form):
    """``draw`` (the device's batch-by-batch alignment draws): classes in any order, each from its Gaussian."""
    x, y, _ = _data()
    stats = ClassStats(6, form, rank=2, eps=0.0)
    stats.add(x, y)
    labels = np.random.default_rng(2).permutation(np.repeat([2, 0], 20000))
    feats = stats.draw(labels, np.random.default_rng(1))
    assert feats.dtype == np.float32 and feats.shape == (40000, 6)
    for c in (0, 2):
        mu, cov = _empirical(feats[labels == c].astype(np.float64))
        target = stats.covariance(c)
        scale = np.sqrt(np.diag(target))
        assert np.allclose(mu, stats.means()[c], atol=0.05 * scale.max())
        assert np.abs(cov - target).max() < 0.05 * np.outer(scale, scale).max(), form
    with pytest.raises(ClassStatsError, match="class 5 has no statistics"):
        stats.draw([0, 5], np.random.default_rng(0))


@pytest.mark.parametrize("form", ["full", "diag", "lowrank"])
def test_borrow_scatter_pools_the_neighbours_spread_around_the_own_mean(form):
    x, y, _ = _data()
    base = ClassStats(6, form, rank=6)
    base.add(x, y)
    few = ClassStats(6, form, rank=6)
    rows = x[y == 2][:5] + 10.0  # a new class: 5 rows somewhere else
    few.add(rows, np.zeros(5))
    own_mean, own_m2 = rows.mean(0), (rows - rows.mean(0)).T @ (rows - rows.mean(0))
    few.borrow_scatter(0, base, 1)
    assert np.allclose(few.means()[0], own_mean) and few.count[0] == 5 + 400
    xs = x[y == 1]
    want = (own_m2 + (xs - xs.mean(0)).T @ (xs - xs.mean(0))) / (5 + 400 - 1)
    got = few.covariance(0)
    assert np.allclose(np.diag(got), np.diag(want)) and (form != "full" or np.allclose(got, want)), form
    with pytest.raises(ClassStatsError, match="same form"):
        few.borrow_scatter(0, ClassStats(6, "shared"), 0)


def test_full_and_diag_statistics_equal_numpy_estimates():
    x, y, _ = _data()
    full, diag = ClassStats(6, "full"), ClassStats(6, "diag")
    for start in range(0, len(x), 97):  # several batches: Chan's merge must be exact
        full.add(x[start:start + 97], y[start:start + 97])
        diag.add(x[start:start + 97], y[start:start + 97])
    for c in range(3):
        mu, cov = _empirical(x[y == c])
        assert np.allclose(full.means()[c], mu) and np.allclose(full.covariance(c), cov)
        assert np.allclose(diag.covariance(c), np.diag(np.diag(cov)))
        assert full.count[c] == 400


def test_shared_is_the_pooled_within_class_covariance():
    x, y, _ = _data()
    shared = ClassStats(6, "shared")
    shared.add(x[:500], y[:500])
    shared.add(x[500:], y[500:])
    scatter = sum(np.cov(x[y == c].T) * (np.sum(y == c) - 1) for c in range(3))
    assert np.allclose(shared.covariance(0), scatter / (len(x) - 3))
    assert np.allclose(shared.covariance(2), shared.covariance(0))


def test_lowrank_reconstruction():
    x, y, _ = _data()
    exact = ClassStats(6, "full")
    exact.add(x, y)
    # rank 6 = d: the factor holds the whole scatter, nothing is lost
    lr6 = ClassStats(6, "lowrank", rank=6)
    lr6.add(x, y)
    for c in range(3):
        assert np.allclose(lr6.covariance(c), exact.covariance(c), atol=1e-9)
    # rank 2 of a rank-2 + 0.1 I structure: the diagonal is exact, the rest close
    lr2 = ClassStats(6, "lowrank", rank=2)
    for start in range(0, len(x), 150):  # streamed: factors re-truncated at every merge
        lr2.add(x[start:start + 150], y[start:start + 150])
    for c in range(3):
        full_cov = exact.covariance(c)
        assert np.allclose(np.diag(lr2.covariance(c)), np.diag(full_cov))
        assert np.allclose(lr2.variance(c), np.diag(full_cov))
        err = np.linalg.norm(lr2.covariance(c) - full_cov) / np.linalg.norm(full_cov)
        assert err < 0.05, err
    # converting full -> lowrank keeps the top-2 eigenpairs exactly
    conv = exact.convert("lowrank", 2)
    vals, vecs = np.linalg.eigh(exact.m2[1])
    top = vecs[:, -2:] * np.sqrt(vals[-2:])
    assert np.allclose(conv.factor[1] @ conv.factor[1].T, top @ top.T, atol=1e-8)
    assert np.allclose(np.diag(conv.covariance(1)), np.diag(exact.covariance(1)))


@pytest.mark.parametrize("form", FORMS)
def test_merge_equals_adding_everything_to_one(form):
    x, y, _ = _data()
    a, b, one = (ClassStats(6, form, rank=6) for _ in range(3))
    a.add(x[:700], y[:700])        # class 1 is split between a and b
    b.add(x[700:], y[700:])
    one.add(x, y)
    merged = a.merge(b)
    assert np.allclose(merged.count, one.count) and np.allclose(merged.means(), one.means())
    for c in range(3):
        assert np.allclose(merged.covariance(c), one.covariance(c), atol=1e-9)
    assert a.count.sum() == 700  # merge returns a new object
    with pytest.raises(ClassStatsError, match="cannot merge"):
        a.merge(ClassStats(6, "diag" if form != "diag" else "full"))


@pytest.mark.parametrize("form", FORMS)
def test_state_round_trip(form):
    x, y, _ = _data(classes=2)
    stats = ClassStats(6, form, rank=3, eps=1e-3)
    stats.add(x, y + 1)  # class 0 never seen
    state = stats.state(dtype=np.float64)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    back = ClassStats.from_state(state)
    assert (back.form, back.rank, back.eps, back.num_classes) == (form, 3, 1e-3, 3)
    assert back.seen().tolist() == [1, 2]
    for c in (1, 2):
        assert np.allclose(back.covariance(c), stats.covariance(c))
    f32 = ClassStats.from_state(stats.state())  # float32 storage: close, not exact
    assert np.allclose(f32.covariance(2), stats.covariance(2), rtol=1e-5, atol=1e-5)
    assert sum(v.nbytes for k, v in stats.state().items() if k not in ("form", "rank", "eps")) == \
        3 * stats.bytes_per_class() + stats.shared_bytes()
    with pytest.raises(ClassStatsError, match="no statistics"):
        back.sample(2, np.random.default_rng(0), classes=[0])


def test_bytes_per_class_and_conversions():
    d = 1280
    assert ClassStats(d, "full").bytes_per_class() == 4 * (1 + d + d * d)  # 6.5 MB
    assert ClassStats(d, "diag").bytes_per_class() == 4 * (1 + 2 * d)
    assert ClassStats(d, "lowrank", rank=16).bytes_per_class() == 4 * (1 + 2 * d + 16 * d)
    assert ClassStats(d, "shared").bytes_per_class() == 4 * (1 + d)
    assert ClassStats(d, "shared").shared_bytes() == 4 * d * d
    x, y, _ = _data()
    full = ClassStats(6, "full")
    full.add(x, y)
    sh = full.convert("shared")
    direct = ClassStats(6, "shared")
    direct.add(x, y)
    assert np.allclose(sh.shared_covariance(), direct.shared_covariance())
    assert np.allclose(full.convert("lowrank", 2).convert("diag").covariance(0), full.convert("diag").covariance(0))
    with pytest.raises(ClassStatsError, match="cannot derive"):
        full.convert("diag").convert("full")


def test_bad_input_is_refused_without_touching_the_statistics():
    stats = ClassStats(4, "full")
    stats.add(np.ones((3, 4)), [0, 0, 1])
    before = stats.state()
    with pytest.raises(ClassStatsError, match=r"\[N, 4\]"):
        stats.add(np.ones((3, 5)), [0, 0, 0])
    with pytest.raises(ClassStatsError, match="NaN"):
        stats.add(np.full((1, 4), np.nan), [0])
    with pytest.raises(ClassStatsError, match="labels"):
        stats.add(np.ones((2, 4)), [0])
    with pytest.raises(ClassStatsError, match="unknown covariance form"):
        ClassStats(4, "banded")
    assert all(np.array_equal(before[k], v) for k, v in stats.state().items())


def test_module_imports_without_torch():
    import edgecl.core.classstats as cs

    code = ("import sys; sys.modules['torch'] = None\n"
            "import importlib.util as u\n"
            f"spec = u.spec_from_file_location('cs', {cs.__file__!r})\n"
            "m = u.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "import numpy as np; s = m.ClassStats(3, 'lowrank', rank=1); s.add(np.eye(3), [0, 0, 1])\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_full_to_lowrank_on_wide_features_uses_the_exact_range():
    """d = 300 with 40 samples per class: the conversion works in the scatter's 39-dimensional
    range (not a full eigh) and must still give exactly the top-r eigenpairs."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 300)) * np.linspace(2.0, 0.1, 300)
    y = np.repeat([0, 1], 40)
    full = ClassStats(300, "full")
    full.add(x, y)
    low = full.convert("lowrank", 8)
    for c in (0, 1):
        vals, vecs = np.linalg.eigh(full.m2[c])
        top = vecs[:, -8:] * np.sqrt(vals[-8:])
        assert np.allclose(low.factor[c] @ low.factor[c].T, top @ top.T, atol=1e-9 * vals[-1])
        assert np.allclose(np.diag(low.covariance(c)), np.diag(full.covariance(c)))
