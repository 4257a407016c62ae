"""Unknown rejection and confidence (edgecl.device.openset): each score, the fits and the
threshold's update pinned to hand-computed values; the engine directory, edgecl run / eval
and enrollment end to end on a synthetic engine."""

import json
import math
import shutil

import numpy as np
import pytest
from helpers import class_frames, fresh_copy, invoke, make_imagefolder, runtime

from edgecl.device import openset


def test_scores_by_hand():
    z = np.array([[2.0, 0.0], [0.0, 0.0]])
    e2 = math.exp(2)
    assert np.allclose(openset.msp(z), [e2 / (e2 + 1), 0.5])
    assert np.allclose(openset.msp(z, T=2.0), [math.e / (math.e + 1), 0.5])
    assert np.allclose(openset.energy(z), [math.log(e2 + 1), math.log(2)])
    assert np.allclose(openset.energy(z, T=2.0), [2 * math.log(math.e + 1), 2 * math.log(2)])
    assert np.allclose(openset.maxlogit(z, T=5.0), [2.0, 0.0])
    assert set(openset.SCORES) >= {"msp", "energy", "maxlogit"} and openset.DEFAULT_SCORE in openset.SCORES


def test_mahalanobis_from_ridge_statistics_equals_the_direct_computation():
    rng = np.random.RandomState(0)
    M, C, n = 6, 3, 40
    means = rng.randn(C, M) * 3
    A = rng.randn(M, M)
    H = np.concatenate([means[c] + rng.randn(n, M) @ A for c in range(C)])
    y = np.repeat(np.arange(C), n)
    G, Q, counts = H.T @ H, H.T @ np.eye(C)[y], np.bincount(y).astype(float)
    mu, cov = openset.shared_covariance(G, Q, counts, k=M - 1)
    assert np.allclose(mu, [H[y == c].mean(0) for c in range(C)])
    R = H - mu[y]
    S = R.T @ R / (len(H) - C)
    P = np.linalg.inv(S)
    x = rng.randn(4, M)
    direct = np.stack([np.einsum("nm,mk,nk->n", x - mu[c], P, x - mu[c]) for c in range(C)], 1)
    assert np.allclose(cov.distances(x, mu), direct, rtol=1e-6)
    assert np.allclose(openset.mahalanobis(x, mu, cov), -direct.min(1))
    # compact: k < M keeps the leading directions and the mean of the others
    _, small = openset.shared_covariance(G, Q, counts, k=2)
    ev = np.sort(np.linalg.eigvalsh(S))[::-1]
    assert np.allclose(small.eig, ev[:2]) and math.isclose(small.rest, ev[2:].mean(), rel_tol=1e-9)


def test_temperature_fit_by_hand():
    # two images right by a margin of 1, one wrong by 1: NLL(beta) = (2 log(1+e^-b) + log(1+e^b)) / 3,
    # zero derivative at sigmoid(b) = 2/3, b = ln 2: T = 1 / ln 2
    z = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert math.isclose(openset.fit_temperature(z, np.array([0, 0, 0])), 1 / math.log(2), rel_tol=1e-6)
    # scaling the logits scales T
    assert math.isclose(openset.fit_temperature(3 * z, np.array([0, 0, 0])), 3 / math.log(2), rel_tol=1e-6)


def test_platt_map_by_hand_and_ece():
    # two confidence levels (log-odds +1 and -1), right 3 times in 4 and 1 time in 4: the saturated
    # fit has sigmoid(a + b) = 3/4 and sigmoid(-a + b) = 1/4, so a = ln 3, b = 0
    s = 1 / (1 + math.exp(-1))
    conf = np.array([s] * 4 + [1 - s] * 4)
    correct = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    a, b = openset.fit_platt(conf, correct, l2=0.0)
    assert math.isclose(a, math.log(3), rel_tol=1e-6) and abs(b) < 1e-8
    assert np.allclose(openset.confidence(np.array([[1.0, 0.0]]), 1.0, (a, b)), [0.75])
    # ECE, 15 bins: 0.9, 0.9 (one right) and 0.2 (wrong): 2/3 |0.5 - 0.9| + 1/3 |0 - 0.2|
    assert math.isclose(openset.ece(np.array([0.9, 0.9, 0.2]), np.array([1, 0, 0])), 1 / 3, rel_tol=1e-9)
    bins = openset.reliability(np.array([0.9, 0.9, 0.2]), np.array([1, 0, 0]))
    assert len(bins) == 15 and bins[13][2:] == (2, 0.9, 0.5) and bins[2][2] == 1


def test_threshold_auroc_fpr_by_hand():
    assert openset.threshold_for([1, 2, 3, 4], 0.75) == 2.0  # 3 of 4 reach 2, 2 of 4 reach 3
    assert openset.threshold_for([1, 2, 3, 4], 1.0) == 1.0
    assert openset.threshold_for([1, 2, 3, 4], 0.5) == 3.0
    assert openset.auroc([3, 2], [1, 2]) == 0.875  # pairs: 1, 1, 1, and a tie 0.5
    assert openset.auroc([1], [2]) == 0.0
    assert openset.fpr_at_tpr([1, 2, 3, 4], [1.5, 2.5, 0], tpr=0.75) == 1 / 3  # threshold 2: only 2.5 passes
    for bad in (0, 1.5, -0.1):
        with pytest.raises(Exception, match="--accept-rate"):
            openset.check_accept_rate(bad)


def test_threshold_follows_the_classes_by_hand():
    """The threshold is recomputed from the held-out images under the current heads: classes added
    raise it (what the prediction gives), a removed engine class's images drop out."""
    state = {"key": 0, "bases": [0, 1], "shift": 0.0}
    feats = {"main": np.array([[1.0], [2.0], [3.0], [4.0]], np.float16)}
    calib = openset.Calibration("maxlogit", 0.5, 1.0, (1.0, 0.0), feats, np.array([0, 0, 1, 1]))

    def predict(f):  # one "logit": the feature plus what the state adds
        return f["main"].astype(np.float64) + state["shift"]

    o = openset.OpenSet(calib, predict, lambda: state["key"], lambda: state["bases"])
    assert o.threshold() == 3.0  # half of {1, 2, 3, 4} reach 3
    assert o.threshold(0.75) == 2.0
    state.update(key=1, shift=10.0)  # e.g. an enrollment raised every held-out image's top score
    assert o.threshold() == 13.0
    state.update(key=2, bases=[1, None])  # engine class 0 removed, an enrolled class beside class 1
    assert o.threshold() == 14.0  # only {13, 14} are left
    j = o.judge(np.array([[13.5], [14.5]]))
    assert j["known"].tolist() == [False, True] and j["threshold"] == 14.0
    assert np.allclose(j["score"], [13.5, 14.5])
    expert = openset.OpenSet(calib, predict, lambda: state["key"], lambda: state["bases"], unknown_below=0.5)
    assert expert.threshold() == 0.5
    state.update(key=3, bases=[None])  # only enrolled classes left: no held-out image, nothing rejected
    assert o.threshold() == float("-inf") and o.judge(np.array([[-1e9]]))["known"].tolist() == [True]


# ----------------------------------------------------------------------------- end to end

def calibrate_engine(eng, per_class: int = 12, accept_rate: float = 0.9):
    """Give a synthetic engine directory an open-set calibration the way edgecl export does
    (held-out frames of its classes through the graph and the heads), re-binding the manifest."""
    from safetensors.numpy import save_file

    from edgecl.core.durable import sha256_file
    from edgecl.device.heads import predict

    rt = runtime(eng, project_in_engine=False)
    n = len(rt.classes)
    frames = np.concatenate([class_frames(c, per_class, seed=7) for c in range(n)])
    labels = np.repeat(np.arange(n), per_class)
    feats = {ln: v for ln, v in rt.features(frames).items() if ":" not in ln}
    logits = predict({ln: h.logits(feats[ln]) for ln, h in rt.heads.heads.items()}, rt.aggregation)
    fit = openset.calibrate(logits, labels)
    save_file({**{f"features.{ln}": f.astype(np.float16) for ln, f in feats.items()},
               "labels": labels.astype(np.int32)}, str(eng / openset.FILE))
    m = json.loads((eng / "manifest.json").read_text())
    m["files"][openset.FILE] = sha256_file(eng / openset.FILE)
    m["open_set"] = {"score": "maxlogit", "accept_rate": accept_rate, "temperature": fit["temperature"],
                     "platt": fit["platt"], "file": openset.FILE, "images": int(len(labels))}
    (eng / "manifest.json").write_text(json.dumps(m, indent=1))
    return eng


@pytest.fixture
def calibrated(engines, tmp_path):
    return calibrate_engine(fresh_copy(engines["main"], tmp_path / "eng"))


def test_runtime_judges_and_enrollment_moves_the_threshold(calibrated, tmp_path):
    rt = runtime(calibrated, store=tmp_path / "store")
    held = rt.open_set.held_out_scores()
    t0 = rt.open_set.threshold()
    assert math.isclose(t0, openset.threshold_for(held, 0.9))
    assert (held >= t0).mean() >= 0.9
    res = rt.classify(class_frames(0, 4, seed=11))
    v = res["open_set"]
    assert v["known"].shape == (4,) and np.all((v["confidence"] > 0) & (v["confidence"] < 1))
    assert [t[0][0] for t in rt.top(res)] == [rt.classes[0] if k else "unknown" for k in v["known"]]
    # enrolling a class re-derives the threshold from the held-out images under the new heads
    rt.enroll_frames("newcomer", class_frames(6, 8, seed=2))
    t1 = rt.open_set.threshold()
    feats = {ln: np.asarray(f, np.float32) for ln, f in rt.open_set.calib.features.items()}
    expect = openset.threshold_for(openset.maxlogit(rt.predict_features(feats)[0]), 0.9)
    assert math.isclose(t1, expect, rel_tol=1e-6) and t1 != t0
    rt.heads.commit()
    # a rename changes nothing numerically; removing an engine class drops its held-out images
    rt.heads.rename("class1", "renamed")
    assert math.isclose(rt.open_set.threshold(), t1, rel_tol=1e-6)
    rt.heads.remove("class2")
    keep = rt.open_set.calib.labels != 2
    expect = openset.threshold_for(openset.maxlogit(rt.predict_features(
        {ln: f[keep] for ln, f in feats.items()})[0]), 0.9)
    assert math.isclose(rt.open_set.threshold(), expect, rel_tol=1e-6)
    rt.heads.commit()
    # after a restart the store's classes give the same threshold
    again = runtime(calibrated, store=tmp_path / "store")
    assert math.isclose(again.open_set.threshold(), expect, rel_tol=1e-6)
    assert math.isclose(runtime(calibrated, store=tmp_path / "store", accept_rate=1.0).open_set.threshold(),
                        float(again.open_set.held_out_scores().min()))


def test_run_jsonl_and_eval_report_unknowns(calibrated, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    frames = tmp_path / "frames"
    frames.mkdir()
    import cv2

    for i, f in enumerate(np.concatenate([class_frames(0, 3, seed=5), class_frames(9, 3, seed=5)])):
        cv2.imwrite(str(frames / f"{i:02d}.png"), f)
    out = tmp_path / "run.jsonl"
    res = invoke(["run", str(calibrated), "--source", str(frames), "--headless", "--jsonl", str(out),
                  "--max-frames", "6", "--backend", "ort-cpu", "--accept-rate", "0.8"])
    assert res.exit_code == 0, res.output
    assert "unknown rejection: maxlogit score below" in res.output and "80% of 72 held-out images" in res.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 6
    for line in lines:
        assert set(line) >= {"unknown", "score", "threshold", "confidence"}
        assert line["unknown"] == (line["top"][0][0] == "unknown") == (line["score"] < line["threshold"])
    # eval: known images of the engine's classes, unknown ones of other classes
    known = make_imagefolder(tmp_path / "known", n_classes=2, n_train=1, n_val=3)
    unknown = tmp_path / "unknown" / "val"
    shutil.copytree(make_imagefolder(tmp_path / "u", n_classes=2, n_train=1, n_val=3, seed=4) / "val", unknown)
    for d in unknown.iterdir():
        d.rename(d.with_name("other-" + d.name))
    res = invoke(["eval", str(calibrated), "--data", str(known), "--unknown-data", str(unknown.parent), "--json",
                  "--backend", "ort-cpu"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    op = got["open_set"]
    assert 0 <= got["ece"] <= 1 and 0 <= got["ece_uncalibrated"] <= 1
    assert op["score"] == "maxlogit" and op["known"] == 6 and op["unknown"] == 6
    assert set(op) >= {"auroc", "fpr_at_95tpr", "auroc_msp", "accept_rate", "unknown_rejected",
                       "accuracy_accepted", "target_accept_rate", "threshold"}
    assert 0 <= op["auroc"] <= 1 and 0 <= op["auroc_msp"] <= 1 and op["target_accept_rate"] == 0.9
    # unknown data holding a known class is refused in one line
    bad = tmp_path / "bad" / "val"
    shutil.copytree(known / "val" / "class0", bad / "class0")
    res = invoke(["eval", str(calibrated), "--data", str(known), "--unknown-data", str(bad.parent)])
    assert res.exit_code != 0 and "holds classes the engine knows" in res.output


def test_uncalibrated_engine_refuses_accept_rate_and_keeps_unknown_below(engines, tmp_path):
    from edgecl.core.errors import EdgeclError

    with pytest.raises(EdgeclError, match="without unknown-rejection calibration"):
        runtime(engines["main"], store=tmp_path / "s", accept_rate=0.9)
    with pytest.raises(EdgeclError, match="not both"):
        runtime(engines["main"], store=tmp_path / "s", accept_rate=0.9, unknown_below=0.2)
    rt = runtime(engines["main"], store=tmp_path / "s", unknown_below=1e9)
    res = rt.classify(class_frames(0, 2, seed=3))
    assert rt.top(res)[0][0][0] == "unknown" and res["open_set"]["confidence"] is None
    assert runtime(engines["main"], store=tmp_path / "s").classify(class_frames(0, 1, seed=3))["open_set"] is None
