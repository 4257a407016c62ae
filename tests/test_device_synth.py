"""A synthetic engine directory for the device tests (tiny ONNX graph built with onnx.helper,
RanPAC heads and statistics solved in numpy): seconds to build, no training.

Class c's frames are noisy images of a class colour pattern; the graph's features are a fixed
random linear map of the pixels, so the classes are separable and the heads are meaningful.
"""

import json
from pathlib import Path

import numpy as np

SIZE = 16


def class_frames(c: int, n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """uint8 BGR frames of synthetic class ``c`` (any c >= 0, also classes the engine never saw)."""
    base = np.random.RandomState(1000 + c).randint(0, 256, (4, 4, 3)).astype(np.float64)
    base = np.kron(base, np.ones((size // 4, size // 4, 1)))
    rng = np.random.RandomState(seed * 7919 + c)
    return np.clip(base[None] + rng.randn(n, size, size, 3) * 30, 0, 255).astype(np.uint8)


def _graph(path: Path, learners: list, d: int, seed: int = 0) -> dict:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)
    n_in = SIZE * SIZE * 3
    nodes = [helper.make_node("Cast", ["input"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["xf", "shape"], ["flat"])]
    inits = [numpy_helper.from_array(np.array([-1, n_in], np.int64), "shape")]
    outputs, mats = [], {}
    for ln in learners:
        P = (rng.randn(n_in, d) / (255.0 * np.sqrt(n_in))).astype(np.float32)
        mats[ln] = P
        inits.append(numpy_helper.from_array(P, f"P_{ln}"))
        nodes.append(helper.make_node("MatMul", ["flat", f"P_{ln}"], [f"features_{ln}"]))
        outputs.append(helper.make_tensor_value_info(f"features_{ln}", TensorProto.FLOAT, ["batch", d]))
    graph = helper.make_graph(nodes, "synthetic", [helper.make_tensor_value_info(
        "input", TensorProto.UINT8, ["batch", SIZE, SIZE, 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return mats


def make_engine_dir(path, learners=("main",), classes: int = 6, per_class: int = 40, d: int = 24, M: int = 64,
                    lam: float = 1.0, gamma: float = 1.0, record_counts: bool = False, seed: int = 0,
                    head: str = "ranpac") -> Path:
    """Write an engine directory (format of edgecl.device.engine_dir) with RanPAC heads and
    statistics, or SimpleCIL prototypes (``head="prototypes"``, no statistics)."""
    from safetensors.numpy import save_file

    from edgecl.core.durable import sha256_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mats = _graph(path / "model.fp32.onnx", list(learners), d, seed)
    frames = np.concatenate([class_frames(c, per_class, seed=1) for c in range(classes)])
    labels = np.repeat(np.arange(classes), per_class)
    heads, stats = {}, {}
    for i, ln in enumerate(learners):
        f = frames.reshape(len(frames), -1).astype(np.float32) @ mats[ln]
        if head == "prototypes":
            heads.update({f"{ln}.prototypes.sums": np.stack([f[labels == c].sum(0) for c in range(classes)]).astype(
                np.float64), f"{ln}.prototypes.counts": np.bincount(labels).astype(np.float64)})
            continue
        W_rand = np.random.RandomState(seed + 10 + i).randn(d, M).astype(np.float32)
        h = np.maximum(f @ W_rand, 0).astype(np.float64)
        Y = np.eye(classes)[labels]
        G, Q = h.T @ h, h.T @ Y
        W = np.linalg.solve(G + lam * np.eye(M), Q)
        heads.update({f"{ln}.ranpac.W": W.astype(np.float32), f"{ln}.ranpac.W_rand": W_rand,
                      f"{ln}.ranpac.lambda": np.array([lam])})
        stats.update({f"{ln}.ranpac.G": G, f"{ln}.ranpac.Q": Q})
        if record_counts:
            stats[f"{ln}.ranpac.counts"] = np.bincount(labels).astype(np.float64)
    save_file(heads, str(path / "heads.safetensors"))
    if stats:
        save_file(stats, str(path / "stats.safetensors"))
    names = [f"class{c}" for c in range(classes)]
    (path / "classes.json").write_text(json.dumps(names))
    files = {n: sha256_file(path / n) for n in ("model.fp32.onnx", "heads.safetensors", "stats.safetensors",
                                                 "classes.json") if (path / n).is_file()}
    manifest = {
        "format": "edgecl-engine", "format_version": 1, "method": "safe" if len(learners) > 1 else "ranpac",
        "input": {"name": "input", "size": SIZE, "layout": "NHWC", "dtype": "uint8", "channel_order": "BGR",
                  "mean": [0.5] * 3, "std": [0.5] * 3},
        "learners": {ln: {"output": f"features_{ln}", "feature_dim": d, "head": head} for ln in learners},
        "aggregation": {"kind": "entropy", "gamma": gamma} if len(learners) > 1 else None,
        "classes": {"file": "classes.json", "count": classes}, "precision": "fp32", "batch_range": [1, 8, 32],
        "models": {"fp32": {"file": "model.fp32.onnx", "runtime": "onnxruntime"}}, "engines": [], "files": files}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return path


def test_synthetic_engine_dir_classifies_its_classes(tmp_path):
    from edgecl.device.runtime import Runtime

    eng = make_engine_dir(tmp_path / "eng")
    rt = Runtime(eng, "ort-cpu", log=lambda m: None)
    frames = np.concatenate([class_frames(c, 10, seed=5) for c in range(6)])
    pred = rt.classify(frames)["scores"].argmax(1)
    assert (pred == np.repeat(np.arange(6), 10)).mean() >= 0.9
