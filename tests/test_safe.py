"""SAFE's learner mechanics on a tiny random ViT (seconds): the slow learner is frozen after
session 1, the fast one keeps learning, each has its own statistics, and the aggregate is the
entropy-weighted mix of the two heads."""

import numpy as np
import pytest
import torch
from helpers import TINY_VIT, blob_images, cnn_pet_kinds, pet_kinds

from edgecl import pet as petlib
from edgecl.backbones import create_backbone
from edgecl.config import resolve_config
from edgecl.learners.safe import SAFE
from edgecl.losses import entropy_aggregate


def _images(classes, n=8, seed=0):
    return blob_images(classes, n, seed, num_names=4, key="test")


VIT = TINY_VIT
CNN = {"name": "tf_efficientnet_lite0", "weights": "random", "kwargs": {}}


def _learner(backbone=VIT, kinds=("ssf",), **safe):
    cfg = resolve_config("safe", overrides={
        "backbone": backbone, "pet": {"kinds": list(kinds)},
        "data": {"input_size": 32}, "ranpac": {"M": 64}, "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
        "safe": {"fast_epochs": 1, **safe}})
    torch.manual_seed(0)
    bb = create_backbone(cfg.backbone.name, "random", **cfg.backbone.kwargs)
    learner = SAFE(cfg, bb)
    learner.progress = False
    return learner


# every PET kind on the ViT, and every kind a CNN takes on EfficientNet-Lite0
CASES = [("vit", VIT, k) for k in pet_kinds()] + [("lite0", CNN, k) for k in cnn_pet_kinds()]


@pytest.mark.parametrize("backbone,kinds", [(bb, [k]) for _, bb, k in CASES], ids=[f"{a}-{k}" for a, _, k in CASES])
def test_slow_frozen_fast_learns_and_heads_are_separate(backbone, kinds):
    learner = _learner(backbone, kinds, temperature="fit")
    learner.learn(0, _images([0, 1], seed=1), [0, 1])
    learner.num_seen = 2
    slow_after_1 = {k: v.clone() for k, v in petlib.pet_state_dict(learner.slow.model).items()}
    fast_after_1 = {k: v.clone() for k, v in petlib.pet_state_dict(learner.fast.model).items()}
    assert all(torch.equal(slow_after_1[k], fast_after_1[k]) for k in slow_after_1)  # fast starts as the slow
    G_slow_1 = learner.slow_head.G.clone()

    learner.learn(1, _images([2, 3], seed=2), [2, 3])
    slow_after_2 = petlib.pet_state_dict(learner.slow.model)
    fast_after_2 = petlib.pet_state_dict(learner.fast.model)
    assert all(torch.equal(slow_after_1[k], slow_after_2[k]) for k in slow_after_1)
    assert any(not torch.equal(fast_after_1[k], fast_after_2[k]) for k in fast_after_1)
    assert learner.slow_head.Q.shape[1] == learner.fast_head.Q.shape[1] == 4
    assert not torch.equal(learner.slow_head.G, G_slow_1)  # session 2 added to the slow statistics
    assert not torch.equal(learner.slow_head.W_rand, learner.fast_head.W_rand)
    assert learner.slow_cls.weight.shape[0] == learner.fast_cls.weight.shape[0] == 4

    out = learner.predict(_images([0, 1, 2, 3], n=3, seed=3))
    T = learner.temperature
    assert T["slow"] != 1.0 and T["fast"] != 1.0  # fitted on the held-out rows
    agg, w = entropy_aggregate(torch.from_numpy(out["slow"]) / T["slow"], torch.from_numpy(out["fast"]) / T["fast"],
                               learner.cfg.safe.gamma)
    assert np.allclose(out["main"], agg.numpy()) and np.allclose(out["aggregate"], agg.numpy())
    assert np.allclose(learner.aggregation_weights(out), w)
    raw, _ = entropy_aggregate(torch.from_numpy(out["slow"]), torch.from_numpy(out["fast"]), learner.cfg.safe.gamma)
    assert np.allclose(out["aggregate_raw"], raw.numpy())

    # the bundle state alone rebuilds both learners (PET weights, RanPAC heads, cosine heads)
    twin = _learner(backbone, kinds, temperature="fit")
    twin.load_state(learner.state(), learner.meta())
    again = twin.predict(_images([0, 1, 2, 3], n=3, seed=3))
    assert twin.temperature == learner.temperature
    for key in ("slow", "fast", "aggregate"):
        assert np.allclose(again[key], out[key], atol=1e-4), key


def test_channels_last_features_equal_plain_nchw():
    """The learners run channels-last for speed; the features must be those of the plain model."""
    learner = _learner(CNN, ["ssf"])
    images = _images([0, 1], n=3, seed=4)
    got = learner.features(learner.slow, "slow", images)
    x = torch.from_numpy(np.ascontiguousarray(images.images))
    plain = learner.slow.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        want = plain(learner.normalize(x).contiguous())
    assert learner.prepare(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _batch(learner, classes, seed):
    images = _images(classes, n=4, seed=seed)
    x = learner.prepare(torch.from_numpy(np.ascontiguousarray(images.images)))
    return x, torch.as_tensor(images.labels)


@pytest.mark.parametrize("which", ["slow", "fast"])
def test_each_loss_term_enters_the_step_with_its_weight(which):
    """Every term of Eq. 2-7 is in the step, scaled by its configured weight; changing one weight
    changes the gradient."""
    names = {"slow": {"diag": "lambda_diag", "rdn": "lambda_rdn"}, "fast": {"cc": "lambda_cc", "cos": "lambda_cos"}}
    learner = _learner(fast_epochs=1)
    learner.learn(0, _images([0, 1], seed=1), [0, 1])
    learner.num_seen = 2
    if which == "fast":
        learner.train_fast = lambda *a: None  # only its rows: the step is called by hand below
        from edgecl.learners.safe import _append_rows
        _append_rows(learner.slow_cls, torch.randn(2, learner.ptm.feature_dim), trainable=False)
        _append_rows(learner.fast_cls, torch.randn(2, learner.ptm.feature_dim), trainable=True)
    x, y = _batch(learner, [0, 1] if which == "slow" else [2, 3], seed=5)
    params = petlib.pet_parameters((learner.slow if which == "slow" else learner.fast).model)
    for p in params:
        p.requires_grad_(True)  # the slow learner is frozen after session 1

    def step():
        torch.manual_seed(0)
        return learner.slow_step(x, y) if which == "slow" else learner.fast_step(x, y, num_old=2)

    def grads(terms):
        return torch.autograd.grad(sum(terms.values()), params, allow_unused=True)

    base = step()
    assert set(base) == {"ce", *names[which]}
    for term, key in names[which].items():
        before = getattr(learner.cfg.safe, key)
        assert before > 0
        setattr(learner.cfg.safe, key, 3 * before)
        tripled = step()
        assert torch.allclose(tripled[term], 3 * base[term], rtol=1e-4), term
        assert torch.allclose(tripled["ce"], base["ce"]), term
        g3 = grads(tripled)
        setattr(learner.cfg.safe, key, before)
        g1 = grads(step())
        assert any(a is not None and not torch.allclose(a, b) for a, b in zip(g3, g1)), term


def test_refresh_changes_nothing_when_the_fast_learner_has_not_moved():
    """safe.fast_epochs = 0: the fast learner never moves, so the refreshed G_f / Q_f equal the
    direct accumulation (the never-refreshed head kept beside it) exactly; the refresh did run."""
    learner = _learner(fast_epochs=0, refresh_fast=True, temperature="fit", keep_stale=True, refresh_draws=8)
    for t, classes in enumerate(([0, 1], [2, 3], [4, 5])):
        learner.learn(t, _images(classes, seed=10 + t), classes)
        learner.num_seen = classes[-1] + 1
    assert [r["classes"] for r in learner.history["refresh"]] == [2, 4]
    assert torch.equal(learner.fast_head.G, learner.fast_head_stale.G)
    assert torch.equal(learner.fast_head.Q, learner.fast_head_stale.Q)
    assert torch.equal(learner.fast_head.G_hold, learner.fast_head_stale.G_hold)
    out = learner.predict(_images([0, 1, 2, 3, 4, 5], n=2, seed=3))
    assert np.array_equal(out["fast"], out["fast_stale"])
    # the stale head's own temperature fit sees the same rows: the calibrated aggregates agree,
    # and differ from the raw one (the temperature was fitted, not left at 1)
    assert learner.temperature["fast_stale"] == learner.temperature["fast"] != 1.0
    assert set(learner.meta()["temperatures"]) == {"slow", "fast"}  # the diagnostic head's stays out
    assert np.array_equal(out["aggregate"], out["aggregate_stale"])
    assert not np.allclose(out["aggregate"], out["aggregate_raw"])


def test_sigma_temperature_is_the_cosine_heads_scale():
    """safe.temperature: sigma multiplies each learner's RanPAC logits by its cosine head's sigma
    (the authors' code): T = 1 / sigma, the fast head's sigma trained on in later sessions, the
    slow one's fixed; the keep_stale diagnostic of that form equals the shipped aggregate."""
    learner = _learner(temperature="sigma", keep_stale=True)
    for t, classes in enumerate(([0, 1], [2, 3])):
        learner.learn(t, _images(classes, seed=20 + t), classes)
        learner.num_seen = classes[-1] + 1
    s_slow, s_fast = learner.slow_cls.sigma.item(), learner.fast_cls.sigma.item()
    assert s_slow != s_fast  # the fast learner's head went on training
    assert learner.temperature["slow"] == pytest.approx(1 / s_slow)
    assert learner.temperature["fast"] == learner.temperature["fast_stale"] == pytest.approx(1 / s_fast)
    assert learner.meta()["temperatures"] == {"slow": pytest.approx(1 / s_slow), "fast": pytest.approx(1 / s_fast)}
    out = learner.predict(_images([0, 1, 2, 3], n=2, seed=3))
    assert np.allclose(out["aggregate"], out["aggregate_sigma"])
    assert np.allclose(out["aggregate"], out["aggregate_stale_sigma"])  # no refresh: the same fast head
    assert not np.allclose(out["aggregate"], out["aggregate_raw"])
