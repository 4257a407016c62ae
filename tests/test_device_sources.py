"""edgecl.device.sources: source parsing and the CSI pipeline, live sources that reconnect
and drop stale frames (fake captures), video files and image folders."""

import numpy as np
import pytest
from fakes.capture import FakeCapture
from helpers import SIZE, class_frames


def test_csi_pipeline_and_source_parsing(tmp_path):
    from edgecl.device.sources import csi_pipeline, parse_source

    p = csi_pipeline(1, 1920, 1080, 30)
    assert p.startswith("nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM), width=(int)1920")
    assert "framerate=(fraction)30/1" in p and p.endswith("appsink drop=1 max-buffers=1") and "format=(string)BGR" in p
    assert parse_source("csi://1") == ("csi", 1)
    assert parse_source("0") == ("camera", 0) and parse_source("/dev/video2") == ("camera", "/dev/video2")
    assert parse_source("rtsp://cam/stream")[0] == "stream"
    assert parse_source(str(tmp_path)) == ("folder", tmp_path)


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
