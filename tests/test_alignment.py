"""SLCA's classifier alignment in numpy (edgecl.core.alignment) against training's torch alignment,
the authors' heuristics, and the device's SLCA-family linear head: enrollment by alignment, the
store (commit, reload, remove, rename, merge), bench."""

import dataclasses
import types

import numpy as np
import pytest
from helpers import QUIET, class_frames, labelled_frames, make_engine_dir, runtime

from edgecl.core.alignment import adjust_draws, align, head_scales, mean_factors, sessions_of
from edgecl.core.classstats import ClassStats
from edgecl.core.formats import AlignmentSpec


@pytest.fixture(scope="module")
def linear_engine(tmp_path_factory):
    return make_engine_dir(tmp_path_factory.mktemp("linear") / "eng", head="linear")


@pytest.fixture
def no_offset(monkeypatch):
    """The alignment alone: the enrolled classes' logit offset (chosen on a real 90-class engine,
    in units of its logits' spread) off on the synthetic engine."""
    from edgecl.device.heads.linear import LinearHead

    monkeypatch.setattr(LinearHead, "offset", 0.0)


def _torch_alignment(stats, blocks, w0, b0, spec, session):
    """SLCA.align (training's torch path) on a stand-in learner: (weight, bias, the draws it used)."""
    import torch

    from edgecl.learners.slca import SLCA, SessionLinear

    head = SessionLinear(w0.shape[1])
    for k in blocks:
        head.add_session(k)
    with torch.no_grad():
        start = 0
        for layer, k in zip(head.heads, blocks):
            layer.weight.copy_(torch.from_numpy(w0[start:start + k]))
            layer.bias.copy_(torch.from_numpy(b0[start:start + k]))
            start += k
    fake = types.SimpleNamespace(cfg=types.SimpleNamespace(seed=spec.seed), device="cpu", history={})
    fake._align_epochs = lambda *a: SLCA._align_epochs(fake, *a)
    aligned = SLCA.align(fake, stats, head, session, spec=spec).export()
    return aligned["weight"].numpy(), aligned["bias"].numpy()


def _training_draws(stats, blocks, spec, session):
    """The batches training's alignment draws (same seeds, same generators), for the numpy path."""
    import torch

    rng = np.random.default_rng(spec.seed + 1009 * session)
    gen = torch.Generator().manual_seed(spec.seed + 1013 * session)
    sessions, last = sessions_of(blocks), len(blocks) - 1
    epochs = []
    for _ in range(spec.epochs):
        x, y = stats.sample(spec.samples_per_class, rng)
        x = adjust_draws(x, y, stats.mean.astype(np.float32), sessions, last, spec, rng)
        order = torch.randperm(len(y), generator=gen).numpy()
        epochs.append([(x[order[s:s + spec.batch_size]], y[order[s:s + spec.batch_size]])
                       for s in range(0, len(y), spec.batch_size)])
    return epochs


@pytest.mark.parametrize("logit_norm", ["session", "global"])
@pytest.mark.parametrize("heuristics", [{}, {"mean_scale": True, "fc_scale_mu": 0.05}])
def test_numpy_alignment_equals_the_torch_alignment_on_the_same_draws(logit_norm, heuristics):
    rng = np.random.default_rng(0)
    blocks, d = [2, 2, 1], 8
    stats = ClassStats(d, "lowrank", rank=3)
    centres = rng.normal(0, 2, (5, d))
    for c in range(5):
        stats.add(centres[c] + rng.normal(0, 0.5, (20, d)), np.full(20, c))
    w0 = rng.normal(0, 0.3, (5, d)).astype(np.float32)
    b0 = rng.normal(0, 0.1, 5).astype(np.float32)
    spec = AlignmentSpec(epochs=3, samples_per_class=16, batch_size=24, lr=0.05, momentum=0.9, weight_decay=0.01,
                         tau=0.1, logit_norm=logit_norm, seed=3, **heuristics)
    W_t, b_t = _torch_alignment(stats, blocks, w0, b0, spec, session=2)
    W, b, losses = align(w0, b0, blocks, _training_draws(stats, blocks, spec, 2), spec)
    W = W * head_scales(sessions_of(blocks), 2, spec.fc_scale_mu)[:, None]
    assert np.abs(W - w0).max() > 0.05 and losses[-1] < losses[0]  # it learned something
    np.testing.assert_allclose(W, W_t, atol=1e-4)
    np.testing.assert_allclose(b, b_t, atol=1e-4)


def test_the_authors_heuristics_pinned():
    sessions = np.array([0, 0, 1, 2])
    # SLCA: the mean of a class of session t scaled by 0.9 + 0.1 (t + 1) / (T + 1); T = 2
    np.testing.assert_allclose(mean_factors(sessions, 2), [0.9 + 0.1 / 3, 0.9 + 0.1 / 3, 0.9 + 0.2 / 3, 1.0])
    # SLCA++: session t's head input scaled by 1 + mu (T - t)
    np.testing.assert_allclose(head_scales(sessions, 2, 0.02), [1.04, 1.04, 1.02, 1.0])
    means = np.ones((4, 3), np.float32)
    x = np.zeros((4, 3), np.float32)
    y = np.arange(4)
    out = adjust_draws(x.copy(), y, means, sessions, 2, AlignmentSpec(mean_scale=True), np.random.default_rng(0))
    np.testing.assert_allclose(out[:, 0], mean_factors(sessions, 2) - 1, rtol=1e-6)  # the draw moves by (f - 1) mu
    ones = np.ones((4, 3), np.float32)
    shrunk = adjust_draws(ones.copy(), y, means, sessions, 2, AlignmentSpec(fc_scale_mu=0.02), np.random.default_rng(0))
    u = np.random.default_rng(0).random(4)
    np.testing.assert_allclose(shrunk[:, 0], 1 / (1 + (0.02 + 0.02 * (u - 0.5)) * (2 - sessions)), rtol=1e-6)
    off = adjust_draws(ones.copy(), y, means, sessions, 2, AlignmentSpec(), np.random.default_rng(0))
    np.testing.assert_array_equal(off, ones)


# ----------------------------------------------------------------------------- the device

def _accuracy(rt, x, y):
    pred = rt.classify(x)["scores"].argmax(1)
    return np.array([(pred[y == c] == c).mean() for c in np.unique(y)])


def test_a_linear_engine_enrolls_by_alignment_and_the_store_keeps_it(linear_engine, tmp_path, no_offset):
    store = tmp_path / "store"
    logs = []
    rt = runtime(linear_engine, store=store)
    x, y = labelled_frames(range(7), 12, seed=5)
    before = rt.classify(x)["scores"]
    assert _accuracy(rt, x[y < 6], y[y < 6]).min() == 1.0
    info = rt.enroll_frames("new", class_frames(6, 20, seed=9))
    assert info["classes"] == 7 and info["rows"] == 20
    head = rt.heads.heads["main"]
    assert head.last_update["aligned_classes"] == 7 and head.last_update["losses"][-1] < head.last_update["losses"][0]
    acc = _accuracy(rt, x, y)
    assert acc[6] >= 0.9 and acc[:6].min() >= 0.9, acc  # the new class learned, the old ones kept
    rt.heads.commit()
    again = runtime(linear_engine, store=store, log=logs.append)  # the store's solution: no alignment at start
    np.testing.assert_array_equal(again.classify(x)["scores"], rt.classify(x)["scores"])
    assert not any("aligning" in m for m in logs)
    again.heads.rename("class0", "zero")
    again.heads.remove("new")
    again.heads.commit()
    third = runtime(linear_engine, store=store)
    assert third.classes[0] == "zero" and "new" not in third.classes
    np.testing.assert_array_equal(third.classify(x)["scores"], before)  # removal drops the row: the engine's logits


def test_removing_an_engine_class_then_enrolling_aligns_the_remaining_classes(linear_engine, tmp_path, no_offset):
    rt = runtime(linear_engine, store=tmp_path / "store")
    rt.heads.remove("class2")
    x, y = labelled_frames([0, 1, 3, 4, 5], 12, seed=5)
    scores = rt.classify(x)["scores"]
    assert scores.shape[1] == 5 and (scores.argmax(1) == np.repeat(np.arange(5), 12)).mean() == 1.0
    rt.enroll_frames("new", class_frames(6, 20, seed=9))
    assert rt.heads.heads["main"].last_update["aligned_classes"] == 6
    x, y = labelled_frames([0, 1, 3, 4, 5, 6], 12, seed=5)
    assert _accuracy(rt, x, y).min() >= 0.9


def test_a_merged_store_is_aligned_once_then_starts_without_alignment(linear_engine, tmp_path, no_offset):
    from edgecl.cli import main

    a, b = runtime(linear_engine, store=tmp_path / "a"), runtime(linear_engine, store=tmp_path / "b")
    a.enroll_frames("alpha", class_frames(6, 15, seed=1))
    a.heads.commit()
    b.enroll_frames("beta", class_frames(7, 15, seed=2))
    b.heads.commit()
    with pytest.raises(SystemExit) as done:
        main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"),
              "--engine-dir", str(linear_engine)])  # aligned once, here
    assert done.value.code in (0, None)
    logs = []
    merged = runtime(linear_engine, store=tmp_path / "m", log=logs.append)
    assert merged.classes[-2:] == ["alpha", "beta"] and not any("aligning" in m for m in logs)
    x, y = labelled_frames([0, 1, 2, 3, 4, 5, 6, 7], 12, seed=5)
    assert _accuracy(merged, x, y).min() >= 0.8


def test_enrolled_classes_logits_are_offset_by_the_configured_spreads(linear_engine, tmp_path, monkeypatch):
    from edgecl.device.heads.linear import LinearHead

    rt = runtime(linear_engine, store=tmp_path / "s")
    rt.enroll_frames("new", class_frames(6, 10, seed=9))
    head = rt.heads.heads["main"]
    x = labelled_frames(range(7), 3, seed=5)[0]
    with_offset = rt.classify(x)["scores"]
    monkeypatch.setattr(head, "offset", 0.0)
    without = rt.classify(x)["scores"]
    sd = head.logit_sd()
    assert sd > 0 and LinearHead.offset > 0
    np.testing.assert_allclose(with_offset[:, 6] - without[:, 6], LinearHead.offset * sd, rtol=1e-5)
    np.testing.assert_array_equal(with_offset[:, :6], without[:, :6])  # the engine's classes untouched
    monkeypatch.setattr(head, "offset", LinearHead.offset)
    rt.enroll_frames("two", class_frames(7, 10, seed=9))
    rt.heads.remove("new")  # the columns follow: "two" is now column 6, an engine class column 5
    with_offset = rt.classify(x)["scores"]
    monkeypatch.setattr(head, "offset", 0.0)
    without = rt.classify(x)["scores"]
    np.testing.assert_allclose(with_offset[:, 6] - without[:, 6], LinearHead.offset * sd, rtol=1e-5)
    np.testing.assert_array_equal(with_offset[:, :6], without[:, :6])


def test_bench_reports_the_alignment_of_an_enrollment(linear_engine):
    from edgecl.device.bench import run_bench

    res = run_bench(linear_engine, "ort-cpu", frames=5, warmup=1, frame_size=(32, 32), enroll_classes=2,
                    enroll_frames=4, **QUIET)
    enroll = res["enroll"]
    assert enroll["heads"]["main"]["kind"] == "linear" and enroll["heads"]["main"]["aligned_classes"] == 8
    assert enroll["enroll_ms_per_class"]["median"] > 0


def test_a_linear_engine_without_its_alignment_refuses_enrollment_in_one_line(tmp_path):
    import json

    from edgecl.core.durable import sha256_file
    from edgecl.core.errors import EdgeclError

    eng = make_engine_dir(tmp_path / "eng", head="linear")
    mf = json.loads((eng / "manifest.json").read_text())
    del mf["learners"]["main"]["alignment"]  # exported before the alignment was recorded
    (eng / "manifest.json").write_text(json.dumps(mf))
    assert sha256_file(eng / "heads.safetensors")  # the rest is intact
    rt = runtime(eng, store=tmp_path / "s")
    assert rt.classify(labelled_frames([0], 2, seed=1)[0])["scores"].shape == (2, 6)  # it still runs
    with pytest.raises(EdgeclError, match="without the classifier alignment.*export its bundle again"):
        rt.enroll_frames("new", class_frames(6, 5, seed=9))


def test_alignment_spec_round_trips_through_the_manifest(linear_engine):
    from helpers import LINEAR_ALIGNMENT

    from edgecl.device.engine_dir import read_manifest

    spec = read_manifest(linear_engine).learners["main"].alignment
    assert dataclasses.asdict(spec) == LINEAR_ALIGNMENT
