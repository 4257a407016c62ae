"""edgecl.device enrollment (edgecl.device.enroll, heads): enroll, commit, reload, rename,
remove; a class enrolled in steps; SAFE's two learners; SimpleCIL prototypes; engine class
names refused. Synthetic engine directories (helpers.make_engine_dir): seconds on a CPU."""

import dataclasses
import json

import numpy as np
import pytest
from helpers import class_frames, fresh_copy, labelled_frames, make_engine_dir, runtime


def test_enroll_commit_reload_rename_remove(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    rt = runtime(eng)
    x, y = labelled_frames(range(8), 15, seed=7)
    assert (rt.classify(x)["scores"].argmax(1)[:90] == y[:90]).mean() >= 0.9
    for c in (6, 7):
        info = rt.enroll_frames(f"new{c}", class_frames(c, 10, seed=3))
        assert info["rows"] == 10 and info["frames"] == 10  # views averaged per frame and info["update_ms"] > 0
    pred = rt.classify(x)["scores"].argmax(1)
    assert (pred[90:] == y[90:]).mean() >= 0.9 and (pred[:90] == y[:90]).mean() >= 0.9
    ridge = rt.heads.heads["main"].ridge()
    fresh = ridge.solve_fresh()
    assert np.abs(ridge.W - fresh).max() <= 1e-4 * np.abs(fresh).max()
    assert rt.heads.commit() == 1
    hashes = json.loads((eng / "manifest.json").read_text())["files"]
    from edgecl.core.durable import sha256_file
    assert all(sha256_file(eng / f) == h for f, h in hashes.items())  # the engine's bound files are untouched

    rt2 = runtime(eng)  # reload: generation 1, its cached W
    assert rt2.classes == rt.classes and rt2.heads.state.generation == 1
    np.testing.assert_array_equal(rt2.heads.heads["main"].current, rt.heads.heads["main"].current)
    rt2.heads.rename("new6", "six")
    rt2.heads.remove("new7")
    rt2.heads.remove("class0")
    assert rt2.heads.commit() == 2
    rt3 = runtime(eng)
    assert rt3.classes == ["class1", "class2", "class3", "class4", "class5", "six"]
    pred = np.array(rt3.classes)[rt3.classify(x)["scores"].argmax(1)]
    truth = np.array(rt3.classes[:5])[np.repeat(np.arange(5), 15)]  # class1..class5 (frames 15-89)
    assert (pred[15:90] == truth).mean() >= 0.9 and (pred[90:105] == "six").mean() >= 0.9
    ridge = rt3.heads.heads["main"].ridge()
    assert np.abs(ridge.W - ridge.solve_fresh()).max() <= 1e-4 * np.abs(ridge.W).max()


def test_removing_an_enrolled_class_restores_the_engine_head(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    rt = runtime(eng)
    W0 = rt.heads.heads["main"].current.copy()
    rt.enroll_frames("tmp", class_frames(9, 12, seed=2))
    assert rt.heads.heads["main"].current.shape[1] == W0.shape[1] + 1
    rt.heads.remove("tmp")
    np.testing.assert_allclose(rt.heads.heads["main"].current, W0, atol=1e-4 * np.abs(W0).max())


def test_more_frames_for_an_enrolled_class_reweights_its_rows(engines, tmp_path):
    """Enrolling a class in two steps gives the head of enrolling it at once."""
    a = runtime(fresh_copy(engines["main"], tmp_path / "a"))
    b = runtime(fresh_copy(engines["main"], tmp_path / "b"))
    frames = class_frames(8, 16, seed=4)
    a.enroll_frames("x", frames)
    b.enroll_frames("x", frames[:6])
    b.enroll_frames("x", frames[6:])
    want = a.heads.heads["main"].current
    np.testing.assert_allclose(b.heads.heads["main"].current, want, atol=1e-4 * np.abs(want).max())


def test_safe_two_learners_aggregate_and_enroll(engines, tmp_path):
    from edgecl.device.heads import aggregate

    rt = runtime(fresh_copy(engines["safe"], tmp_path / "eng"))
    x, _y = labelled_frames(range(6), 10, seed=8)
    res = rt.classify(x)
    assert res["weights"].shape == (60, 2) and np.allclose(res["weights"].sum(1), 1)
    feats = rt.backend.infer(x)
    logits = rt.heads.logits(feats)
    want = aggregate(logits, rt.aggregation.gamma, temperatures=rt.aggregation.temperatures)
    np.testing.assert_allclose(res["scores"], want, rtol=1e-5, atol=1e-6)
    rt.aggregation = dataclasses.replace(rt.aggregation, predict="fast")  # trained with safe.inference: fast
    np.testing.assert_allclose(rt.classify(x)["scores"], logits["fast"], rtol=1e-5, atol=1e-6)
    rt.aggregation = dataclasses.replace(rt.aggregation, predict="aggregate")
    rt.enroll_frames("seven", class_frames(7, 10, seed=1))
    x7, _ = labelled_frames([7], 10, seed=8)
    assert (rt.classify(x7)["scores"].argmax(1) == 6).mean() >= 0.9
    # the class entered both learners' heads, each from its own features
    per_learner = rt.heads.logits(rt.backend.infer(x7))
    assert set(per_learner) == {"slow", "fast"}
    for name, lg in per_learner.items():
        assert lg.shape == (10, 7) and (lg.argmax(1) == 6).mean() >= 0.8, name
    from edgecl.device.enroll import DEFAULT_POLICY

    assert rt.heads.state.policy == DEFAULT_POLICY  # both learners' heads under the one store policy


def test_simplecil_prototype_engine_enrolls(tmp_path):
    eng = make_engine_dir(tmp_path / "eng", head="prototypes")
    rt = runtime(eng)
    rt.enroll_frames("seven", class_frames(7, 10, seed=1))
    assert rt.heads.commit() == 1
    rt2 = runtime(eng)
    x, y = labelled_frames([0, 1, 2, 3, 4, 5, 7], 8, seed=9)
    assert (rt2.classify(x)["scores"].argmax(1) == y).mean() >= 0.9 and rt2.classes[-1] == "seven"


def test_enroll_into_an_engine_class_name_is_refused(engines, tmp_path):
    from edgecl.core.errors import EdgeclError

    rt = runtime(fresh_copy(engines["main"], tmp_path / "eng"))
    with pytest.raises(EdgeclError, match="is a class of the engine"):
        rt.enroll_frames("class2", class_frames(9, 4, seed=0))
