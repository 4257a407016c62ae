"""SLCA / SLCA++ / sequential fine-tuning: the loss terms pinned to hand-computed values, the
learner's mechanics on a tiny random ViT (seconds), and `edgecl train` -> bundle -> `edgecl
eval` for each method on generated images."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import SLCA_FAMILY, TINY, TINY_VIT, blob_images, invoke

from edgecl import pet as petlib
from edgecl.backbones import create_backbone
from edgecl.config import resolve_config
from edgecl.core.classstats import ClassStats
from edgecl.core.errors import EdgeclError
from edgecl.learners.slca import SLCA, SessionLinear
from edgecl.losses import (
    logit_normalize,
    reverse_cross_entropy,
    symmetric_cross_entropy,
)

# ----------------------------------------------------------------------------- loss pins

def test_symmetric_cross_entropy_by_hand():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    y = torch.tensor([1, 0])
    # CE: -ln(3/4) = 0.287682, -ln(1/4) = 1.386294 -> mean 0.836988
    # RCE = -sum_k p_k log q_k with log 0 := A = -4: 4 * (1 - p_y) = 1.0 and 3.0 -> mean 2.0
    terms = symmetric_cross_entropy(logits, y, alpha=0.5, beta=0.25)
    assert terms["ce"].item() == pytest.approx(0.5 * 0.836988, abs=1e-5)
    assert terms["rce"].item() == pytest.approx(0.25 * 2.0, abs=1e-6)
    # the SLCA++ code's clamp of the one-hot at 1e-4: A = ln 1e-4 = -9.21034
    assert (reverse_cross_entropy(logits[:1], y[:1], log_zero=math.log(1e-4)).item()
            == pytest.approx(0.25 * 9.21034, abs=1e-4))
    # p is clamped at 1e-7 (as the code): a saturated correct prediction still costs 4e-7
    assert (reverse_cross_entropy(torch.tensor([[0.0, 100.0]]), torch.tensor([1])).item()
            == pytest.approx(4e-7, rel=1e-3))
    # beta = 0: plain cross-entropy, no rce term
    assert set(symmetric_cross_entropy(logits, y, 1.0, 0.0)) == {"ce"}


def test_logit_normalisation_by_hand():
    # paper (global norm): [3, 4] / (0.1 * 5) = [6, 8]
    out = logit_normalize(torch.tensor([[3.0, 4.0]]), tau=0.1)
    assert torch.allclose(out, torch.tensor([[6.0, 8.0]]), atol=1e-5)
    # authors' code: mean of the per-session norms, sessions [3, 4] and [0, 2]: (5 + 2) / 2 = 3.5
    out = logit_normalize(torch.tensor([[3.0, 4.0, 0.0, 2.0]]), tau=0.1, blocks=[2, 2])
    assert torch.allclose(out, torch.tensor([[3.0, 4.0, 0.0, 2.0]]) / 0.35, atol=1e-4)
    # a zero logit vector stays finite (eps)
    assert torch.isfinite(logit_normalize(torch.zeros(1, 3), tau=0.1)).all()


# ----------------------------------------------------------------------------- learner mechanics

def _images(classes, n=8, seed=0):
    return blob_images(classes, n, seed, num_names=6, key="slca-test")


def _learner(method, **slca):
    cfg = resolve_config(method, overrides={
        "backbone": TINY_VIT,
        "data": {"input_size": 32}, "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
        "slca": {"ca_samples_per_class": 32, **slca}})
    torch.manual_seed(0)
    learner = SLCA(cfg, create_backbone(cfg.backbone.name, "random", **cfg.backbone.kwargs))
    learner.progress = False
    return learner


def _backbone_weights(learner):
    return {k: v.detach().clone() for k, v in learner.model.model.state_dict().items() if v.is_floating_point()}


def test_slow_learner_lr_groups():
    slca = _learner("slca")
    groups = slca._param_groups(0, slca.head)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.0001])  # head, backbone at 1/100
    n_backbone = sum(p.numel() for p in slca.model.parameters())
    assert sum(p.numel() for p in groups[1]["params"]) == n_backbone  # every weight (no PET)

    pp = _learner("slcapp")
    lora = {id(p) for m in pp.model.modules() if isinstance(m, petlib.LoRA) for _, p in m.pet_named_parameters()}
    for t, lora_lr in ((0, 0.005), (1, 0.001)):  # LoRA: 0.5 x head lr in session 1, then 0.1 x
        groups = pp._param_groups(t, pp.head)
        by_lr: dict = {}
        for g in groups[1:]:
            by_lr.setdefault(round(g["lr"], 8), set()).update(id(p) for p in g["params"])
        assert lora <= by_lr[lora_lr]
        assert len(by_lr[0.001] - lora) > 0  # norms and biases always at 0.1 x head lr
    norms = [p for m in pp.model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    assert norms and all(p.requires_grad for p in norms)  # hybrid slow learner: norms learn too

    seq = _learner("seqft")
    assert [g["lr"] for g in seq._param_groups(0, seq.head)] == pytest.approx([0.01, 0.01])


def test_slca_sessions_stats_alignment_and_bundle_state():
    learner = _learner("slca", backbone_lr_ratio=0.1)
    before = _backbone_weights(learner)
    learner.learn(0, _images([0, 1], seed=1), [0, 1])
    learner.num_seen = 2
    assert learner.aligned is None  # no alignment after the first session
    head1 = {k: v.clone() for k, v in learner.head.state_dict().items()}
    after1 = _backbone_weights(learner)
    assert any(not torch.equal(before[k], after1[k]) for k in before)  # the (slow) backbone learned

    learner.learn(1, _images([2, 3], seed=2), [2, 3])
    learner.num_seen = 4
    # stage 1 left the first session's head alone; the alignment trained a copy of all heads
    assert all(torch.equal(head1[k], learner.head.state_dict()[k]) for k in head1)
    assert learner.aligned is not None and learner.aligned.blocks == [2, 2]
    assert not torch.equal(learner.aligned.heads[0].weight, learner.head.heads[0].weight)
    assert learner.history["ca_2"] and all(np.isfinite(learner.history["ca_2"]))
    # statistics: one Gaussian per class, from that session's model
    assert learner.stats.seen().tolist() == [0, 1, 2, 3] and learner.stats.count.tolist() == [8.0] * 4
    out = learner.predict(_images([0, 1, 2, 3], n=3, seed=3))
    assert out["main"].shape == (12, 4)

    state, meta = learner.state(), learner.meta()
    assert meta["head"] == "linear" and meta["linear"]["aligned"] and meta["classstats"]["form"] == "lowrank"
    exported = ClassStats.from_state({k.split(".", 1)[1]: v.numpy() for k, v in state["stats"].items()})
    assert exported.form == "lowrank" and exported.rank == 64 and exported.seen().tolist() == [0, 1, 2, 3]
    assert np.allclose(exported.variance(3), learner.stats.variance(3), rtol=1e-4, atol=1e-6)
    assert set(state) == {"heads", "stats", "finetuned"}
    W, b = state["heads"]["linear.weight"], state["heads"]["linear.bias"]
    f = learner.features(learner.model, "model", _images([0, 1, 2, 3], n=3, seed=3))
    assert np.allclose(out["main"], (f @ W.T + b).numpy(), atol=1e-4)  # the exported head is what predicts

    again = _learner("slca", backbone_lr_ratio=0.1)
    again.load_state(state, meta)
    assert np.allclose(again.predict(_images([0, 1, 2, 3], n=3, seed=3))["main"], out["main"], atol=1e-5)


def test_alignment_fixes_a_biased_classifier():
    """Classifier alignment on three Gaussian classes whose heads are badly biased towards
    the newest session: after alignment the heads classify fresh samples of every class."""
    learner = _learner("slca", ca_epochs=10, ca_samples_per_class=512, tau=0.1)
    d = learner.ptm.feature_dim
    rng = np.random.default_rng(0)
    stats = ClassStats(d, "full")
    mus = rng.normal(size=(3, d)) * 2
    for c in range(3):
        stats.add(mus[c] + rng.normal(size=(64, d)) * 0.5, [c] * 64)
    head = SessionLinear(d)
    head.add_session(2)
    head.add_session(1)
    with torch.no_grad():
        head.heads[1].bias.fill_(2.0)  # the new session's class wins everywhere
    x, y = stats.sample(100, np.random.default_rng(5))
    with torch.no_grad():
        before = (head(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
        aligned = learner.align(stats, head, session=1)
        acc = (aligned(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert before < 0.5 and acc > 0.95, (before, acc)
    assert head.heads[1].bias[0].item() == 2.0  # alignment trains a copy


def test_seqft_fine_tunes_everything_and_never_aligns():
    learner = _learner("seqft")
    before = _backbone_weights(learner)
    learner.learn(0, _images([0, 1], seed=1), [0, 1])
    learner.learn(1, _images([2, 3], seed=2), [2, 3])
    assert learner.aligned is None and learner.cfg.slca.ca_epochs == 0
    after = _backbone_weights(learner)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > 0.5 * len(before)


def test_slca_config_is_checked():
    with pytest.raises(EdgeclError, match="slca.tua"):
        resolve_config("slca", overrides={"slca": {"tua": 0.1}})
    with pytest.raises(EdgeclError, match="slca.cov_form"):
        resolve_config("slca", overrides={"slca": {"cov_form": "banded"}})
    cfg = resolve_config("slcapp", "quick")
    assert (cfg.slca.alpha, cfg.slca.beta, cfg.pet.kinds, cfg.pet.tune_norms) == (0.5, 0.5, ["lora"], True)
    assert resolve_config("slca").slca.backbone_lr_ratio == 0.01
    with pytest.raises(EdgeclError, match="slca.export_cov_form full .* cannot be derived from slca.cov_form diag"):
        _learner("slca", cov_form="diag", export_cov_form="full")


# ----------------------------------------------------------------------------- end to end

@pytest.mark.parametrize("method", SLCA_FAMILY)
def test_train_bundle_eval_and_reproducibility(folder, tmp_path, method):
    out = tmp_path / f"bundle-{method}"
    args = ["train", "--data", str(folder), "--method", method, *TINY, "--set", "slca.ca_samples_per_class=16"]
    res = invoke([*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy"]) == 2 and len(metrics["accuracy_matrix"][1]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["learner"]["head"] == "linear"
    weights = "pet.safetensors" if method == "slcapp" else "finetuned.safetensors"
    assert set(manifest["files"]) >= {"heads.safetensors", "stats.safetensors", weights}
    res = invoke(["eval", str(out), "--data", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"] == pytest.approx(metrics["A_last"], abs=1e-6)
    again = tmp_path / f"again-{method}"
    assert invoke([*args, "--out", str(again)]).exit_code == 0
    assert json.loads((again / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert (again / "heads.safetensors").read_bytes() == (out / "heads.safetensors").read_bytes()
