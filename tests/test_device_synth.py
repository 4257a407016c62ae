"""The synthetic engine directory of the device tests (helpers.make_engine_dir) classifies its
own classes."""

import numpy as np
from helpers import class_frames, make_engine_dir


def test_synthetic_engine_dir_classifies_its_classes(tmp_path):
    from edgecl.device.runtime import Runtime

    eng = make_engine_dir(tmp_path / "eng")
    rt = Runtime(eng, "ort-cpu", log=lambda m: None)
    frames = np.concatenate([class_frames(c, 10, seed=5) for c in range(6)])
    pred = rt.classify(frames)["scores"].argmax(1)
    assert (pred == np.repeat(np.arange(6), 10)).mean() >= 0.9
