"""edgecl.device.backends: ONNX Runtime provider order and choice, TensorRT 8.x and 10.x
plans through a fake ``tensorrt`` module (fakes/tensorrt.py), and a real TensorRT plan
(``-m trt``)."""

import json
import sys

import numpy as np
import pytest
from fakes.tensorrt import FakeCuda, make_fake_tensorrt
from helpers import QUIET, SIZE, fresh_copy, labelled_frames

from edgecl.core.formats import EngineManifest


def test_ort_provider_order_and_choice(engines, monkeypatch):
    import onnxruntime as ort

    from edgecl.core.errors import EdgeclError
    from edgecl.device import backends

    manifest = EngineManifest.read(engines["main"])
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


@pytest.mark.parametrize("version", ["10.3.0", "8.6.1"])
def test_tensorrt_backend_with_fake_module(engines, tmp_path, monkeypatch, version):
    from edgecl.core.durable import sha256_file
    from edgecl.device import backends

    eng = fresh_copy(engines["safe"], tmp_path / "eng")
    manifest = json.loads((eng / "manifest.json").read_text())
    ref = backends.OrtBackend(eng / "model.fp32.onnx", EngineManifest.read(eng).learners, SIZE)
    trt = make_fake_tensorrt(version, compute=lambda x: {f"features_{ln}": v for ln, v in ref.infer(x).items()})
    sha = manifest["files"]["model.fp32.onnx"]
    plan = f"model.fp16.trt{version}.test.{sha[:12]}.plan"
    (eng / plan).write_bytes(b"features_slow,features_fast")
    manifest["engines"] = [{"file": plan, "precision": "fp16", "tensorrt": version, "onnx": "model.fp32.onnx"}]
    manifest["files"][plan] = sha256_file(eng / plan)
    (eng / "manifest.json").write_text(json.dumps(manifest))
    manifest = EngineManifest.read(eng)
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
    manifest.engines[0].tensorrt = "7.0.0"
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
    manifest = EngineManifest.read(eng)
    b = backends.open_backend(eng, manifest, "trt", **QUIET)
    x, _ = labelled_frames(range(6), 6, seed=0)
    ref = backends.OrtBackend(eng / "model.fp32.onnx", manifest.learners, SIZE).infer(x)
    for ln, f in b.infer(x).items():
        np.testing.assert_allclose(f, ref[ln], rtol=1e-3, atol=1e-3)
