"""edgecl.device: rank-k ridge updates, enrollment, the store (generations, corruption, merge),
sources (files, folders, CSI pipeline, reconnect, stale frames), the loop, bench, backends
(ONNX Runtime; TensorRT with a fake module), user errors, and the torch-free import.
Synthetic engine directories (tests/test_device_synth.py): seconds on a CPU."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from test_device_synth import SIZE, class_frames, make_engine_dir
from test_train import invoke

QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return {"main": make_engine_dir(root / "eng-main"), "safe": make_engine_dir(root / "eng-safe", ("slow", "fast")),
            "other": make_engine_dir(root / "eng-other", seed=3), "root": root}


def fresh_copy(src, dst) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("store"))
    return Path(dst)


def runtime(eng, **kw):
    from edgecl.device.runtime import Runtime
    return Runtime(eng, "ort-cpu", **{**QUIET, **kw})


def labelled_frames(classes, n, seed):
    return np.concatenate([class_frames(c, n, seed=seed) for c in classes]), np.repeat(np.arange(len(classes)), n)


# ----------------------------------------------------------------------------- RanPAC updates

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


# ----------------------------------------------------------------------------- enrollment + store

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
    ridge = rt.heads.ridge("main")
    fresh = ridge.solve_fresh()
    assert np.abs(ridge.W - fresh).max() <= 1e-4 * np.abs(fresh).max()
    assert rt.heads.commit() == 1
    hashes = json.loads((eng / "manifest.json").read_text())["files"]
    from edgecl.core.durable import sha256_file
    assert all(sha256_file(eng / f) == h for f, h in hashes.items())  # the engine's bound files are untouched

    rt2 = runtime(eng)  # reload: generation 1, its cached W
    assert rt2.classes == rt.classes and rt2.heads.state.generation == 1
    np.testing.assert_array_equal(rt2.heads.W["main"], rt.heads.W["main"])
    rt2.heads.rename("new6", "six")
    rt2.heads.remove("new7")
    rt2.heads.remove("class0")
    assert rt2.heads.commit() == 2
    rt3 = runtime(eng)
    assert rt3.classes == ["class1", "class2", "class3", "class4", "class5", "six"]
    pred = np.array(rt3.classes)[rt3.classify(x)["scores"].argmax(1)]
    assert (pred[75:90] == "class5").mean() >= 0.9 and (pred[90:105] == "six").mean() >= 0.9
    ridge = rt3.heads.ridge("main")
    assert np.abs(ridge.W - ridge.solve_fresh()).max() <= 1e-4 * np.abs(ridge.W).max()


def test_removing_an_enrolled_class_restores_the_engine_head(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    rt = runtime(eng)
    W0 = rt.heads.W["main"].copy()
    rt.enroll_frames("tmp", class_frames(9, 12, seed=2))
    assert rt.heads.W["main"].shape[1] == W0.shape[1] + 1
    rt.heads.remove("tmp")
    np.testing.assert_allclose(rt.heads.W["main"], W0, atol=1e-4 * np.abs(W0).max())


def test_more_frames_for_an_enrolled_class_reweights_its_rows(engines, tmp_path):
    """Enrolling a class in two steps gives the head of enrolling it at once."""
    a = runtime(fresh_copy(engines["main"], tmp_path / "a"))
    b = runtime(fresh_copy(engines["main"], tmp_path / "b"))
    frames = class_frames(8, 16, seed=4)
    a.enroll_frames("x", frames)
    b.enroll_frames("x", frames[:6])
    b.enroll_frames("x", frames[6:])
    np.testing.assert_allclose(b.heads.W["main"], a.heads.W["main"], atol=1e-4 * np.abs(a.heads.W["main"]).max())


def test_safe_two_learners_aggregate_and_enroll(engines, tmp_path):
    from edgecl.device.heads import aggregate

    rt = runtime(fresh_copy(engines["safe"], tmp_path / "eng"))
    x, _y = labelled_frames(range(6), 10, seed=8)
    res = rt.classify(x)
    assert res["weights"].shape == (60, 2) and np.allclose(res["weights"].sum(1), 1)
    feats = rt.backend.infer(x)
    logits = rt.heads.logits(feats)
    np.testing.assert_allclose(res["scores"], aggregate(logits, rt.aggregation["gamma"]), rtol=1e-5, atol=1e-6)
    rt.aggregation = {**rt.aggregation, "predict": "fast"}  # a bundle trained with safe.inference: fast
    np.testing.assert_allclose(rt.classify(x)["scores"], logits["fast"], rtol=1e-5, atol=1e-6)
    rt.aggregation = {**rt.aggregation, "predict": "aggregate"}
    rt.enroll_frames("seven", class_frames(7, 10, seed=1))
    x7, _ = labelled_frames([7], 10, seed=8)
    assert (rt.classify(x7)["scores"].argmax(1) == 6).mean() >= 0.9
    assert rt.heads.policy_for("fast") == {"alpha": 0.0, "beta": 1.0}


def test_simplecil_prototype_engine_enrolls(tmp_path):
    eng = make_engine_dir(tmp_path / "eng", head="prototypes")
    rt = runtime(eng)
    rt.enroll_frames("seven", class_frames(7, 10, seed=1))
    assert rt.heads.commit() == 1
    rt2 = runtime(eng)
    x, y = labelled_frames([0, 1, 2, 3, 4, 5, 7], 8, seed=9)
    assert (rt2.classify(x)["scores"].argmax(1) == y).mean() >= 0.9 and rt2.classes[-1] == "seven"


def test_store_generations_survive_corruption(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    rt = runtime(eng)
    for i, c in enumerate((6, 7, 8)):
        rt.enroll_frames(f"n{c}", class_frames(c, 5, seed=i))
        rt.heads.commit()
    store = eng / "store"
    assert sorted(p.name for p in store.glob("gen-*")) == [
        "gen-00000002.json", "gen-00000002.safetensors", "gen-00000003.json", "gen-00000003.safetensors"]
    logs = []
    data = bytearray((store / "gen-00000003.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit in the newest generation
    (store / "gen-00000003.safetensors").write_bytes(bytes(data))
    rt2 = runtime(eng, log=logs.append)
    assert rt2.heads.state.generation == 2 and rt2.classes[-1] == "n7"
    assert any("generation 3 is unusable" in m for m in logs)
    (store / "gen-00000002.json").write_text('{"format": "edgecl-store", "generat')  # torn record
    logs.clear()
    rt3 = runtime(eng, log=logs.append)
    assert rt3.heads.state.generation == 0 and len(rt3.classes) == 6
    assert any("starting from the engine directory" in m for m in logs)
    # a commit after recovery writes a new, higher generation; the damaged ones are pruned
    rt3.enroll_frames("again", class_frames(9, 5, seed=0))
    assert rt3.heads.commit() == 4


def test_store_of_another_engine_is_refused(engines, tmp_path):
    from edgecl.core.errors import EdgeclError

    a = runtime(fresh_copy(engines["main"], tmp_path / "a"), store=tmp_path / "s")
    a.enroll_frames("x", class_frames(7, 5, seed=0))
    a.heads.commit()
    with pytest.raises(EdgeclError, match="belongs to another engine"):
        runtime(fresh_copy(engines["other"], tmp_path / "b"), store=tmp_path / "s")


def test_merge_sums_statistics_exactly(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    f6, f7, f8 = (class_frames(c, 8, seed=c) for c in (6, 7, 8))
    a = runtime(eng, store=tmp_path / "a")
    a.enroll_frames("six", f6)
    a.enroll_frames("seven", f7[:4])
    a.heads.commit()
    b = runtime(eng, store=tmp_path / "b")
    b.enroll_frames("seven", f7[4:])
    b.enroll_frames("eight", f8)
    b.heads.commit()
    res = invoke(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"),
                  "--engine-dir", str(eng)])
    assert res.exit_code == 0, res.output
    merged = runtime(eng, store=tmp_path / "m")
    ref = runtime(eng, store=tmp_path / "ref")  # one device that saw everything
    ref.enroll_frames("six", f6)
    ref.enroll_frames("seven", f7)
    ref.enroll_frames("eight", f8)
    assert merged.classes == ref.classes
    for i in range(2):
        np.testing.assert_allclose(merged.heads.ridge("main").statistics()[i], ref.heads.ridge("main").statistics()[i],
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged.heads.W["main"], ref.heads.W["main"],
                               atol=1e-4 * np.abs(ref.heads.W["main"]).max())

    c = runtime(fresh_copy(engines["other"], tmp_path / "other"), store=tmp_path / "c")
    c.enroll_frames("x", f6)
    c.heads.commit()
    res = invoke(["merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "m2")])
    assert res.exit_code == 2 and "different engines" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- sources

def test_csi_pipeline_and_source_parsing(tmp_path):
    from edgecl.device.sources import csi_pipeline, parse_source

    p = csi_pipeline(1, 1920, 1080, 30)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM), width=(int)1920")
    assert "framerate=(fraction)30/1" in p and p.endswith("appsink drop=1 max-buffers=1") and "format=(string)BGR" in p
    assert parse_source("csi://1") == ("csi", 1)
    assert parse_source("0") == ("camera", 0) and parse_source("/dev/video2") == ("camera", "/dev/video2")
    assert parse_source("rtsp://cam/stream")[0] == "stream"
    assert parse_source(str(tmp_path)) == ("folder", tmp_path)


class FakeCapture:
    """A cv2.VideoCapture stand-in: frames numbered from ``start``; fails after ``fail_after``."""

    def __init__(self, start=0, fail_after=None, opened=True):
        self.i, self.fail_after, self.opened, self.start = start, fail_after, opened, start

    def isOpened(self):
        return self.opened

    def read(self):
        if self.fail_after is not None and self.i - self.start >= self.fail_after:
            return False, None
        f = np.full((4, 4, 3), self.i % 256, np.uint8)
        self.i += 1
        return True, f

    def release(self):
        pass


def test_live_source_reconnects_after_loss():
    from edgecl.device.sources import CaptureSource

    caps = iter([FakeCapture(0, fail_after=3), FakeCapture(opened=False), FakeCapture(100, fail_after=2),
                 FakeCapture(200, fail_after=0)])
    logs = []
    src = CaptureSource("rtsp://x", lambda: next(caps), live=True, reconnect=3, backoff_s=0.0, threaded=False,
                        log=logs.append)
    got = [int(f[0, 0, 0]) for f in src]
    assert got == [0, 1, 2, 100, 101]
    assert src.reconnects == 3 and any("reconnecting (1/3)" in m for m in logs)
    assert "3 reconnection attempts failed" in logs[-1]


def test_live_source_drops_stale_frames():
    import time as _t

    from edgecl.device.sources import CaptureSource

    class Camera(FakeCapture):
        def read(self):
            _t.sleep(0.002)  # a 500 FPS camera
            return super().read()

    src = CaptureSource("0", lambda: Camera(0, fail_after=250), live=True, reconnect=0, threaded=True,
                        log=lambda m: None)
    got = []
    for f in src:
        got.append(int(f[0, 0, 0]))
        _t.sleep(0.02)  # a slow consumer
    src.close()
    assert src.frames_dropped > 0 and len(got) < 125 and got == sorted(got) and got[-1] >= 240


def test_file_and_folder_sources(tmp_path):
    import cv2

    from edgecl.core.errors import EdgeclError
    from edgecl.device.sources import open_source

    frames = class_frames(1, 5, seed=0)
    video = tmp_path / "v.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (SIZE, SIZE))
    for f in frames:
        w.write(f)
    w.release()
    with open_source(str(video)) as src:
        got = list(src)
    assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, frames))  # FFV1 is lossless
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(frames[::-1]):
        cv2.imwrite(str(folder / f"{4 - i:03d}.png"), f)
    (folder / "002b.jpg").write_bytes(b"not an image")
    logs = []
    got = list(open_source(str(folder), log=logs.append))
    assert len(got) == 5 and np.array_equal(got[0], frames[0]) and "002b.jpg" in logs[0]
    with pytest.raises(EdgeclError, match="no such file, folder or camera"):
        open_source(str(tmp_path / "missing.mp4"))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(EdgeclError, match="cannot open source"):
        open_source(str(bad))


# ----------------------------------------------------------------------------- loop, CLI

def write_video(path, frames, fps=10):
    import cv2
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), fps, (frames.shape[2], frames.shape[1]))
    for f in frames:
        w.write(f)
    w.release()
    return path


def test_run_headless_jsonl_and_enroll_cli(engines, tmp_path):
    eng = fresh_copy(engines["main"], tmp_path / "eng")
    x, y = labelled_frames(range(6), 6, seed=11)
    big = np.stack([np.kron(f, np.ones((3, 3, 1), np.uint8)) for f in x])  # 48x48 frames: the loop resizes
    video = write_video(tmp_path / "v.avi", big)
    out = tmp_path / "frames.jsonl"
    res = invoke(["run", str(eng), "--source", str(video), "--headless", "--jsonl", str(out), "--max-frames", "30",
                  "--backend", "ort-cpu"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(30))
    assert (set(lines[0]) >= {"frame", "top", "weights", "latency_ms", "engine_ms", "host_ms"}
            and len(lines[0]["top"]) == 3)
    pred = [r["top"][0][0] for r in lines]
    assert np.mean([p == f"class{c}" for p, c in zip(pred, y[:30])]) >= 0.9
    assert json.loads(res.output.strip().splitlines()[-1])["frames"] == 30

    imgs = tmp_path / "newclass"
    imgs.mkdir()
    import cv2
    for i, f in enumerate(class_frames(9, 8, seed=2)):
        cv2.imwrite(str(imgs / f"{i}.png"), np.kron(f, np.ones((2, 2, 1), np.uint8)))
    res = invoke(["enroll", str(eng), "--name", "nine", "--images", str(imgs), "--backend", "ort-cpu"])
    assert res.exit_code == 0, res.output
    assert "enrolled 'nine': 8 frames (8 rows)" in res.output and "committed generation 1" in res.output
    res = invoke(["enroll", str(eng), "--name", "nine-video", "--source", str(video), "--frames", "4"])
    assert res.exit_code == 0 and "committed generation 2" in res.output, res.output
    res = invoke(["enroll", str(eng), "--rename", "nine=9", "--remove", "nine-video"])
    assert res.exit_code == 0, res.output
    res = invoke(["enroll", str(eng), "--list"])
    assert res.output.strip().splitlines()[-1] == "6\t9"
    x9 = np.stack([np.kron(f, np.ones((3, 3, 1), np.uint8)) for f in class_frames(9, 6, seed=5)])
    res = invoke(["run", str(eng), "--source", str(write_video(tmp_path / "nine.avi", x9)), "--headless",
                  "--jsonl", str(out)])
    assert res.exit_code == 0, res.output
    assert all(json.loads(line)["top"][0][0] == "9" for line in out.read_text().splitlines())


def test_bench_json(engines, tmp_path):
    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    res = invoke(["bench", str(eng), "--json", "--frames", "20", "--enroll-classes", "2", "--backend", "ort-cpu"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output.strip().splitlines()[-1])
    assert r["engine_ms"]["median"] > 0 and r["host_ms"]["median"] > 0 and r["fps"] > 0
    assert r["enroll"]["enroll_ms_per_class"]["median"] > 0 and r["enroll"]["M"] == {"slow": 64, "fast": 64}
    assert r["store_generation_bytes"] > 0 and not (eng / "store").exists()  # bench used a temporary store


def one_line(res, *needles):
    """A user error: exit status 2, no traceback, one ``edgecl: error:`` line naming ``needles``."""
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("edgecl: error:")]
    assert "Traceback" not in res.output and len(errors) == 1, res.output
    for n in needles:
        assert n in errors[0], res.output


def test_user_errors(engines, tmp_path):
    import cv2

    from edgecl.core.errors import EdgeclError

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    # an unreadable source
    one_line(invoke(["run", str(eng), "--source", str(tmp_path / "nope.mp4"), "--headless"]), "--source",
             "no such file, folder or camera")
    one_line(invoke(["run", str(eng), "--source", "/dev/video99", "--headless"]), "/dev/video99")
    # a frame of the wrong shape
    rt = runtime(eng)
    with pytest.raises(EdgeclError, match=r"does not fit the engine: it takes uint8 BGR frames of 16x16x3"):
        rt.classify(np.zeros((1, 20, 16, 3), np.uint8))
    with pytest.raises(EdgeclError, match="not an image"):
        rt.fit(np.zeros((10,), np.uint8))
    # an enrollment with no usable frames
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(3):
        cv2.imwrite(str(blank / f"{i}.png"), np.full((32, 32, 3), 128, np.uint8))
    one_line(invoke(["enroll", str(eng), "--name", "x", "--images", str(blank)]), "no usable frames", "blank")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line(invoke(["enroll", str(eng), "--name", "x", "--images", str(empty)]), "has no images")
    one_line(invoke(["enroll", str(eng), "--name", "x"]), "exactly one of --images")
    one_line(invoke(["enroll", str(eng), "--name", "class1", "--images", str(tmp_path / "newclass-none")]), "--images")
    one_line(invoke(["enroll", str(eng), "--remove", "zebra"]), "no such class")
    one_line(invoke(["run", str(eng), "--source", str(blank), "--backend", "warp"]), "--backend 'warp'")
    # an engine directory with a mismatched hash
    shutil.copyfile(engines["other"] / "heads.safetensors", eng / "heads.safetensors")
    one_line(invoke(["run", str(eng), "--source", str(blank), "--headless"]),
             "heads.safetensors does not match the manifest's hash")
    one_line(invoke(["enroll", str(eng), "--name", "x", "--images", str(blank)]), "does not match the manifest's hash")


def test_enroll_into_an_engine_class_name_is_refused(engines, tmp_path):
    from edgecl.core.errors import EdgeclError

    rt = runtime(fresh_copy(engines["main"], tmp_path / "eng"))
    with pytest.raises(EdgeclError, match="is a class of the engine"):
        rt.enroll_frames("class2", class_frames(9, 4, seed=0))


# ----------------------------------------------------------------------------- backends

def test_ort_provider_order_and_choice(engines, monkeypatch):
    import onnxruntime as ort

    from edgecl.core.errors import EdgeclError
    from edgecl.device import backends

    manifest = json.loads((engines["main"] / "manifest.json").read_text())
    logs = []
    b = backends.open_backend(engines["main"], manifest, "auto", log=logs.append)
    assert isinstance(b, backends.OrtBackend) and b.providers == ["CPUExecutionProvider"]
    assert logs == [f"backend: {b.name} (--backend auto)"]
    seen = {}
    real = ort.InferenceSession

    def spy(model, so, providers):
        seen["providers"] = providers
        return real(model, so, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider", "CUDAExecutionProvider",
                                                                 "TensorrtExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", spy)
    backends.open_backend(engines["main"], manifest, "auto", **QUIET)
    assert seen["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    backends.open_backend(engines["main"], manifest, "ort-cuda", **QUIET)
    assert seen["providers"] == ["CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EdgeclError, match="none of CUDAExecutionProvider"):
        backends.open_backend(engines["main"], manifest, "ort-cuda", **QUIET)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    missing = r"--backend trt needs TensorRT \(tensorrt\), which is not installed: pip install 'edgecl\[trt\]'"
    with pytest.raises(EdgeclError, match=missing):
        backends.open_backend(engines["main"], manifest, "trt", **QUIET)


def make_fake_trt_runtime(version, compute):
    """A fake ``tensorrt`` module whose engine runs ``compute(frames) -> {output name: array}``
    on 'device' memory held by :class:`FakeCuda`; records the API calls."""
    import types

    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls = []
    v10 = int(version.split(".")[0]) >= 10

    class Logger:
        WARNING = "W"

        def __init__(self, level):
            pass

    class Context:
        def __init__(self, engine):
            self.engine, self.addr, self.shape = engine, {}, None

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, shape))
            self.shape = shape

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            calls.append(("execute_async_v3",))
            return self._run(self.addr)

        def set_binding_shape(self, index, shape):
            calls.append(("set_binding_shape", index, shape))
            self.shape = shape

        def execute_async_v2(self, bindings, stream):
            calls.append(("execute_async_v2", len(bindings)))
            return self._run({n: bindings[i] for i, n in enumerate(self.engine.names)})

        def _run(self, addr):
            mem = FakeCuda.memory
            x = mem[addr["input"]][: int(np.prod(self.shape))].view(np.uint8).reshape(self.shape)
            for name, arr in compute(x).items():
                mem[addr[name]][: arr.nbytes] = arr.astype(np.float32).view(np.uint8).ravel()
            return True

    class Engine:
        def __init__(self, blob):
            self.names = ["input"] + [n for n in blob.decode().split(",")]

        def create_execution_context(self):
            return Context(self)

        if not v10:
            @property
            def num_bindings(self):
                return len(self.names)

            def get_binding_name(self, i):
                return self.names[i]

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            calls.append(("deserialize", len(blob)))
            return Engine(blob) if blob else None

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


class FakeCuda:
    memory: ClassVar[dict] = {}

    def __init__(self):
        self.stream = 7

    def malloc(self, nbytes):
        ptr = 1000 + len(FakeCuda.memory)
        FakeCuda.memory[ptr] = np.zeros(nbytes, np.uint8)
        return ptr

    def htod(self, ptr, array):
        FakeCuda.memory[ptr][: array.nbytes] = np.ascontiguousarray(array).view(np.uint8).ravel()

    def dtoh(self, array, ptr):
        array.view(np.uint8).ravel()[:] = FakeCuda.memory[ptr][: array.nbytes]

    def sync(self):
        pass


@pytest.mark.parametrize("version", ["10.3.0", "8.6.1"])
def test_tensorrt_backend_with_fake_module(engines, tmp_path, monkeypatch, version):
    from edgecl.core.durable import sha256_file
    from edgecl.device import backends

    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    ref = backends.OrtBackend(eng / "model.fp32.onnx", manifest["learners"], SIZE)
    trt = make_fake_trt_runtime(version, lambda x: {f"features_{ln}": v for ln, v in ref.infer(x).items()})
    sha = manifest["files"]["model.fp32.onnx"]
    plan = f"model.fp16.trt{version}.test.{sha[:12]}.plan"
    (eng / plan).write_bytes(b"features_slow,features_fast")
    manifest["engines"] = [{"file": plan, "precision": "fp16", "tensorrt": version, "onnx": "model.fp32.onnx"}]
    manifest["files"][plan] = sha256_file(eng / plan)
    (eng / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(backends, "CudaMemory", FakeCuda)
    logs = []
    b = backends.open_backend(eng, manifest, "auto", log=logs.append)
    assert isinstance(b, backends.TensorRTBackend) and f"tensorrt {version} ({plan})" in logs[0]
    x, _ = labelled_frames(range(3), 12, seed=0)  # 36 frames: two chunks of the plan's max batch 32
    got, want = b.infer(x), ref.infer(x)
    for ln in ("slow", "fast"):
        np.testing.assert_allclose(got[ln], want[ln], rtol=1e-6)
    if version.startswith("10"):
        assert ("set_input_shape", "input", (32, SIZE, SIZE, 3)) in trt.calls
        assert ("set_input_shape", "input", (4, SIZE, SIZE, 3)) in trt.calls and ("execute_async_v3",) in trt.calls
    else:
        assert ("set_binding_shape", 0, (4, SIZE, SIZE, 3)) in trt.calls and ("execute_async_v2", 3) in trt.calls
    # a plan for another TensorRT version is not used: auto falls back to ONNX Runtime
    manifest["engines"][0]["tensorrt"] = "7.0.0"
    assert isinstance(backends.open_backend(eng, manifest, "auto", **QUIET), backends.OrtBackend)


@pytest.mark.trt
def test_real_tensorrt_backend(engines, tmp_path):
    """A real TensorRT plan of the synthetic graph (built here) through the device backend."""
    trt = pytest.importorskip("tensorrt")
    from edgecl.core.durable import sha256_file
    from edgecl.device import backends

    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = (0 if int(trt.__version__.split(".")[0]) >= 10
             else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse((eng / "model.fp32.onnx").read_bytes())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, SIZE, SIZE, 3), (8, SIZE, SIZE, 3), (32, SIZE, SIZE, 3))
    config.add_optimization_profile(profile)
    sha = manifest["files"]["model.fp32.onnx"]
    plan = f"model.fp32.trt{trt.__version__}.gpu.{sha[:12]}.plan"
    (eng / plan).write_bytes(bytes(builder.build_serialized_network(network, config)))
    manifest["engines"] = [{"file": plan, "precision": "fp32", "tensorrt": trt.__version__, "onnx": "model.fp32.onnx"}]
    manifest["files"][plan] = sha256_file(eng / plan)
    (eng / "manifest.json").write_text(json.dumps(manifest))
    b = backends.open_backend(eng, manifest, "trt", **QUIET)
    x, _ = labelled_frames(range(6), 6, seed=0)
    ref = backends.OrtBackend(eng / "model.fp32.onnx", manifest["learners"], SIZE).infer(x)
    for ln, f in b.infer(x).items():
        np.testing.assert_allclose(f, ref[ln], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- torch-free

def test_device_runs_without_torch(engines, tmp_path):
    """Every device module imports, and the loop and enrollment run, with torch and timm unimportable."""
    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    x, _ = labelled_frames(range(6), 2, seed=1)
    folder = tmp_path / "frames"
    folder.mkdir()
    import cv2
    for i, f in enumerate(x):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    device_dir = Path(__file__).resolve().parents[1] / "device"
    modules = sorted(p.stem for p in device_dir.glob("*.py") if p.stem != "__init__")
    code = ("import sys; sys.modules['torch'] = None; sys.modules['timm'] = None; sys.modules['torchvision'] = None\n"
            "import importlib\n"
            f"for m in {modules!r}: importlib.import_module('edgecl.device.' + m)\n"
            "from edgecl.cli import main\n"
            f"main(['run', {str(eng)!r}, '--source', {str(folder)!r}, '--headless', '--max-frames', '5'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["frames"] == 5
    code2 = code.replace(f"main(['run', {str(eng)!r}, '--source', {str(folder)!r}, '--headless', '--max-frames', '5'])",
                         f"main(['enroll', {str(eng)!r}, '--name', 'z', '--images', {str(folder)!r}])")
    out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "committed generation 1" in out.stdout, out.stderr + out.stdout
    assert "torch" not in out.stderr


def test_window_loop_enroll_key_and_topk_unknown(engines, tmp_path, monkeypatch):
    """The window loop (display faked): 'e' enrolls the next frames as a class and commits it."""
    import cv2

    from edgecl.device.loop import run_loop
    from edgecl.device.runtime import topk
    from edgecl.device.sources import FolderSource

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    folder = tmp_path / "frames"
    folder.mkdir()
    frames = np.concatenate([class_frames(1, 3, seed=0), class_frames(9, 8, seed=1), class_frames(9, 4, seed=2)])
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    keys = iter([-1, -1, ord("e"), *([-1] * 30)])  # "e" after the 3 frames of class1: frames 3-10 enroll
    shown = []
    monkeypatch.setattr(cv2, "imshow", lambda name, img: shown.append(img.shape))
    monkeypatch.setattr(cv2, "waitKey", lambda ms: next(keys))
    monkeypatch.setattr(cv2, "destroyAllWindows", lambda: None)
    rt = runtime(eng)
    jsonl = tmp_path / "f.jsonl"
    summary = run_loop(rt, FolderSource(folder), headless=False, jsonl=str(jsonl), enroll_frames=8,
                       enroll_name="nine", **QUIET)
    assert summary["frames"] == 15 and summary["enrolled"] == 1 and len(shown) == 15
    assert rt.classes[-1] == "nine" and runtime(eng).classes[-1] == "nine"  # committed
    last = [json.loads(line)["top"][0][0] for line in jsonl.read_text().splitlines()][-3:]
    assert last == ["nine"] * 3  # the frames after the enrollment are recognised
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.25, 0.1]])
    assert topk(scores, ["a", "b", "c"], 2, unknown_below=0.5) == [[("a", 0.9), ("c", 0.3)],
                                                                     [("unknown", 0.25), ("a", 0.2)]]
