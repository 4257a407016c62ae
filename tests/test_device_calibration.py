"""The enrolled classes' calibration (edgecl.device.heads.ranpac, docs/DEVICE.md "Enrollment
across class splits"): an enrolled class's logits over the engine's training samples get the mean
and spread of a typical engine class's logits over the same samples, less the margin; the engine's
classes keep their logits; across processes (one ``edgecl enroll`` per class, 30 classes) the heads
stay equal to a fresh solve from the same statistics. Synthetic engines: seconds, except the
30-process test (slow)."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import class_frames, labelled_frames, make_engine_dir, runtime

from edgecl.device.enroll import DEFAULT_POLICY, UNCALIBRATED


def _engine_rows(rt, classes=6, per_class=40):
    """The head inputs of the synthetic engine's own training frames (helpers.make_engine_dir)."""
    x, y = labelled_frames(range(classes), per_class, seed=1)
    feats = rt.backend.infer(x)
    return rt.heads.head_inputs(feats)["main"].astype(np.float64), y


def test_the_enrolled_class_gets_a_typical_engine_class_logit_distribution(tmp_path):
    eng = make_engine_dir(tmp_path / "eng", record_counts=True)
    rt = runtime(eng)
    head = rt.heads.heads["main"]
    H, y = _engine_rows(rt)
    # the reference: medians over the engine classes of their logits' mean and sd over its samples
    W0 = head.W.astype(np.float64)
    ref_mean, ref_sd = head.reference()
    assert ref_mean == pytest.approx(np.median((H @ W0).mean(0)), rel=1e-5)
    assert ref_sd == pytest.approx(np.median((H @ W0).std(0)), rel=1e-4)

    rt.enroll_frames("seven", class_frames(7, 10, seed=3))
    head = rt.heads.heads["main"]
    scores = head.scores(H.astype(np.float32))
    raw = H.astype(np.float32) @ head.current
    np.testing.assert_allclose(scores[:, :6], raw[:, :6], rtol=1e-6)  # the engine's classes: unchanged
    seven = scores[:, 6].astype(np.float64)  # over the engine's samples, all negatives of "seven"
    margin = DEFAULT_POLICY["margin"]
    assert seven.mean() == pytest.approx(ref_mean - margin * ref_sd, abs=1e-4 * ref_sd)
    assert seven.std() == pytest.approx(ref_sd, rel=1e-4)
    # and it is still recognised
    x7, _ = labelled_frames([7], 10, seed=8)
    assert (rt.classify(x7)["scores"].argmax(1) == 6).mean() >= 0.9


def test_an_uncalibrated_store_keeps_the_raw_logits(tmp_path):
    eng = make_engine_dir(tmp_path / "eng", record_counts=True)
    rt = runtime(eng, policy=UNCALIBRATED)
    rt.enroll_frames("seven", class_frames(7, 10, seed=3))
    head = rt.heads.heads["main"]
    h = np.random.RandomState(0).rand(5, head.width).astype(np.float32)
    np.testing.assert_array_equal(head.scores(h), h @ head.current)
    cols, _scale, _offset = head.affine()
    assert len(cols) == 0


def test_the_calibration_follows_rename_removal_and_reload(tmp_path):
    eng = make_engine_dir(tmp_path / "eng", record_counts=True)
    rt = runtime(eng)
    for c in (6, 7, 8):
        rt.enroll_frames(f"new{c}", class_frames(c, 10, seed=3))
    rt.heads.commit()
    before = rt.heads.heads["main"].affine()
    rt2 = runtime(eng)  # another process: the store's W, the calibration recomputed from the state
    again = rt2.heads.heads["main"].affine()
    assert rt2.heads._stats is None  # serving needs Q and the counts, read alone: never G
    for a, b in zip(before, again):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    rt2.heads.rename("new6", "six")
    rt2.heads.remove("new7")
    rt2.heads.remove("class0")
    rt2.heads.commit()
    rt3 = runtime(eng)
    cols, scale, offset = rt3.heads.heads["main"].affine()
    assert list(cols) == [5, 6]  # six and new8, after class1..class5
    x, _ = labelled_frames([6, 8], 10, seed=8)
    pred = np.array(rt3.classes)[rt3.classify(x)["scores"].argmax(1)]
    assert (pred[:10] == "six").mean() >= 0.9 and (pred[10:] == "new8").mean() >= 0.9


@pytest.mark.slow  # 30 processes: about a minute
def test_thirty_classes_enrolled_one_per_process_equal_a_fresh_solve(tmp_path):
    from PIL import Image

    eng = make_engine_dir(tmp_path / "eng", record_counts=True, M=128)
    store = tmp_path / "store"
    for c in range(6, 36):
        folder = tmp_path / f"images-{c}"
        folder.mkdir()
        for i, frame in enumerate(class_frames(c, 8, seed=3)):
            Image.fromarray(frame[:, :, ::-1]).save(folder / f"{i}.png")
        res = subprocess.run([sys.executable, "-m", "edgecl", "enroll", str(eng), "--name", f"new{c}", "--images",
                              str(folder), "--store", str(store), "--backend", "ort-cpu"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
    rt = runtime(eng, store=store)
    assert len(rt.classes) == 36 and rt.heads.state.generation == 30
    head = rt.heads.heads["main"]
    served = np.asarray(head.current, np.float64)
    fresh = head.ridge().solve_fresh()
    assert np.abs(served - fresh).max() <= 1e-4 * np.abs(fresh).max()
    x, y = labelled_frames(range(36), 6, seed=8)
    h = rt.heads.head_inputs(rt.backend.infer(x))["main"]
    served_scores = head.scores(h)
    head.current = fresh.astype(np.float32)  # the same state solved afresh, its calibration recomputed
    head.settle()
    fresh_scores = head.scores(h)
    assert np.abs(served_scores - fresh_scores).max() <= 1e-4 * np.abs(fresh_scores).max()
    assert (rt.classify(x)["scores"].argmax(1) == y).mean() >= 0.8
