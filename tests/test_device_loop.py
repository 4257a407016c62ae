"""The device loop and its commands (edgecl.device.loop, bench; `edgecl run`, `enroll`,
`bench`): headless runs with JSONL, enrollment from the CLI, bench, the window loop with
its enroll key, and the user errors."""

import json
import shutil

import numpy as np
import pytest
from helpers import QUIET, class_frames, fresh_copy, invoke, labelled_frames, one_line_error, runtime


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
    assert r["enroll"]["enroll_ms_per_class"]["median"] > 0
    assert r["enroll"]["heads"] == {ln: {"kind": "ranpac", "row_width": 64} for ln in ("slow", "fast")}
    assert r["store_generation_bytes"] > 0 and not (eng / "store").exists()  # bench used a temporary store


def test_user_errors(engines, tmp_path):
    import cv2

    from edgecl.core.errors import EdgeclError

    eng = fresh_copy(engines["main"], tmp_path / "eng")
    # an unreadable source
    one_line_error(invoke(["run", str(eng), "--source", str(tmp_path / "nope.mp4"), "--headless"]), "--source",
                   "no such file, folder or camera")
    one_line_error(invoke(["run", str(eng), "--source", "/dev/video99", "--headless"]), "/dev/video99")
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
    one_line_error(invoke(["enroll", str(eng), "--name", "x", "--images", str(blank)]), "no usable frames", "blank")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(invoke(["enroll", str(eng), "--name", "x", "--images", str(empty)]), "has no images")
    one_line_error(invoke(["enroll", str(eng), "--name", "x"]), "exactly one of --images")
    one_line_error(invoke(["enroll", str(eng), "--name", "class1", "--images", str(tmp_path / "newclass-none")]),
                   "--images")
    one_line_error(invoke(["enroll", str(eng), "--remove", "zebra"]), "no such class")
    one_line_error(invoke(["run", str(eng), "--source", str(blank), "--backend", "warp"]), "--backend 'warp'")
    # an engine directory with a mismatched hash
    shutil.copyfile(engines["other"] / "heads.safetensors", eng / "heads.safetensors")
    one_line_error(invoke(["run", str(eng), "--source", str(blank), "--headless"]),
                   "heads.safetensors does not match the manifest's hash")
    one_line_error(invoke(["enroll", str(eng), "--name", "x", "--images", str(blank)]),
                   "does not match the manifest's hash")


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
    assert topk(scores, ["a", "b", "c"], 2, known=[True, False]) == [[("a", 0.9), ("c", 0.3)],
                                                                       [("unknown", 0.25), ("a", 0.2)]]
    # an engine without unknown calibration: --unknown-below is a raw threshold on the top score
    rt = runtime(eng, unknown_below=0.5)
    res = {"scores": scores, "open_set": rt.judge(scores)}
    c = rt.classes
    assert rt.top(res, 2) == [[(c[0], 0.9), (c[2], 0.3)], [("unknown", 0.25), (c[0], 0.2)]]
