"""edgecl export: folding, the ONNX graph, the engine directory and its evaluation, the parity
report, INT8 QDQ with the calibration cache, the TensorRT builder (fake module) and user errors.
Small random-init ViT bundles trained on generated images (seconds on a CPU)."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from fakes.tensorrt import make_fake_tensorrt
from helpers import PET_FOLDED, PET_KEPT, TINY, generic_methods, invoke, make_imagefolder, one_line_error, pet_kinds


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGECL_CACHE", str(root / "cache"))
    data = make_imagefolder(root / "data")
    bundles = {}
    for method in generic_methods():  # every method with RanPAC / prototype heads (SLCA family: below)
        out = root / f"bundle-{method}"
        extra = {"ranpac": ["--set", "pet.kinds=[ssf, lora]"],
                 # SAFE ships raw logits (T = 1); fitted temperatures must reach the engine too
                 "safe": ["--set", "safe.temperature=fit"]}.get(method, [])
        res = invoke(["train", "--data", str(data), "--method", method, "--out", str(out), *TINY, *extra])
        assert res.exit_code == 0, res.output
        bundles[method] = out
    engines = {}
    for method, bundle in bundles.items():
        out = root / f"engine-{method}"
        res = invoke(["export", str(bundle), "--out", str(out)])
        assert res.exit_code == 0, res.output
        engines[method] = out
    yield {"root": root, "data": data, "bundles": bundles, "engines": engines}
    mp.undo()


def tiny_backbone():
    from edgecl.backbones import create_backbone
    return create_backbone("vit_tiny_patch16_224", "random", img_size=32, patch_size=8, depth=2)


# ----------------------------------------------------------------------------- folding

# every PET kind alone, the folded kinds together, and with a kept one
@pytest.mark.parametrize("kinds", [[k] for k in pet_kinds()] + [list(PET_FOLDED), [*PET_FOLDED, "adapter"]],
                         ids="+".join)
def test_folding_is_exact_and_keeps_bare_structure(kinds, tmp_path):
    from edgecl import pet as petlib
    from edgecl.config import PETConfig
    from edgecl.export.graph import ExportGraph, export_onnx, fold, onnx_op_counts

    torch.manual_seed(0)
    bare = tiny_backbone()
    model = tiny_backbone()
    model.load_state_dict(bare.state_dict())
    petlib.inject_pet(model.model, PETConfig(kinds=kinds))
    with torch.no_grad():  # PET away from its identity init
        for n, p in model.named_parameters():
            if any(k in n for k in ("gamma", "beta", ".A.", ".B.", "down", "up")):
                p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(4, 3, 32, 32)
    folded = fold(model)
    with torch.no_grad():
        ref, got = model.eval()(x), folded(x)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert not any(isinstance(m, (petlib.SSF, petlib.LoRA)) for m in folded.modules())
    if not set(kinds) & set(PET_KEPT):  # the exported graph has the bare backbone's structure
        norm = dict(mean=(0.5,) * 3, std=(0.5,) * 3)
        export_onnx(ExportGraph({"main": folded}, **norm), tmp_path / "f.onnx", 32)
        export_onnx(ExportGraph({"main": bare}, **norm), tmp_path / "b.onnx", 32)
        ops = lambda f: {k: v for k, v in onnx_op_counts(f).items() if k != "Identity"}  # noqa: E731
        assert ops(tmp_path / "f.onnx") == ops(tmp_path / "b.onnx")  # (Identity: deduplicated equal weights)
    else:  # the modules of the kept kinds are still there
        kept = {"adapter": petlib.Adapter, "vpt": petlib.DeepVPT}
        for kind in set(kinds) & set(PET_KEPT):
            assert any(isinstance(m, kept[kind]) for m in folded.modules()), kind


def test_graph_with_two_learners_has_an_output_each(tmp_path):
    import onnxruntime as ort

    from edgecl.export.graph import ExportGraph, export_onnx

    torch.manual_seed(0)
    graph = ExportGraph({"slow": tiny_backbone(), "fast": tiny_backbone()}, (0.5,) * 3, (0.5,) * 3)
    export_onnx(graph, tmp_path / "m.onnx", 32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["features_slow", "features_fast"]
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    frames = np.random.RandomState(0).randint(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    slow, fast = sess.run(None, {"input": frames})
    with torch.no_grad():
        x = torch.from_numpy(frames[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1  # BGR in, RGB model
        np.testing.assert_allclose(slow, graph.models["slow"](x).numpy(), atol=1e-4)


def test_static_same_padding_is_exact_and_leaves_no_shape_subgraph(tmp_path):
    """tf_ EfficientNets pad "SAME" from the input shape at run time; the export resolves it for
    its fixed size (a quantized Shape/Ceil/Pad subgraph broke the INT8 model)."""
    import onnxruntime as ort
    from timm.layers import Conv2dSame

    from edgecl.export.graph import ExportGraph, export_onnx, onnx_op_counts, static_same_padding

    class Net(torch.nn.Module):
        feature_dim = 6

        def __init__(self):
            super().__init__()
            self.a = Conv2dSame(3, 4, 3, stride=2)
            self.b = Conv2dSame(4, 6, 5, stride=2, groups=2)
            self.c = Conv2dSame(6, 6, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x))).mean((2, 3))

    torch.manual_seed(0)
    for size in (31, 32):
        graph = ExportGraph({"main": Net()}, (0.5,) * 3, (0.5,) * 3).eval()
        frames = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
        with torch.no_grad():
            ref = graph(frames)[0]
            assert static_same_padding(graph, size) == 3
            got = graph(frames)[0]
        assert not any(isinstance(m, Conv2dSame) for m in graph.modules())
        assert (got - ref).abs().max().item() <= 1e-6
        export_onnx(graph, tmp_path / f"m{size}.onnx", size)
        ops = onnx_op_counts(tmp_path / f"m{size}.onnx")
        assert not {"Shape", "Ceil", "Gather"} & set(ops), ops
        sess = ort.InferenceSession(str(tmp_path / f"m{size}.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(sess.run(None, {"input": frames.numpy()})[0], ref.numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- engine dir

@pytest.mark.parametrize("method", generic_methods())
def test_engine_dir_eval_matches_bundle_and_parity(work, method):
    import onnx
    import onnxruntime as ort

    eng, bundle, data = work["engines"][method], work["bundles"][method], work["data"]
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["format"] == "edgecl-engine" and manifest["input"]["channel_order"] == "BGR"
    assert manifest["input"]["dtype"] == "uint8" and manifest["input"]["layout"] == "NHWC"
    assert set(manifest["files"]) >= {"model.fp32.onnx", "heads.safetensors", "classes.json", "parity.json"}
    names = ["slow", "fast"] if method == "safe" else ["main"]
    assert {n: manifest["learners"][n]["output"] for n in names} == {n: f"features_{n}" for n in names}
    onnx.checker.check_model(onnx.load(str(eng / "model.fp32.onnx")), full_check=True)
    assert onnx.load(str(eng / "model.fp32.onnx")).opset_import[0].version >= 17
    sess = ort.InferenceSession(str(eng / "model.fp32.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 5):  # dynamic batch
        assert sess.run(None, {"input": np.zeros((b, 32, 32, 3), np.uint8)})[0].shape[0] == b

    parity = json.loads((eng / "parity.json").read_text())["fp32"]
    assert parity["images"] > 0 and "bundle val data" in parity["source"]
    assert parity["max_rel"] <= 1e-4 and parity["top1_agreement"] == 1.0
    for n in names:
        assert set(parity["learners"][n]) >= {"max_abs", "max_rel", "top1_agreement"}

    res = invoke(["eval", str(eng), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    ref = json.loads(invoke(["eval", str(bundle), "--data", str(data), "--json"]).stdout)
    assert got["n"] == ref["n"] == 16 and got["backend"].startswith("onnxruntime")
    assert got["model"] == "model.fp32.onnx" and got["store_generation"] == 0
    assert abs(got["accuracy"] - ref["accuracy"]) <= 0.1
    if method == "safe":  # each learner alone too, and what the bundle predicts is recorded
        temps = json.loads((bundle / "manifest.json").read_text())["learner"]["temperatures"]
        assert set(temps) == {"slow", "fast"} and all(t > 0 and t != 1.0 for t in temps.values())
        assert manifest["aggregation"] == {"kind": "entropy", "gamma": 1.0, "predict": "aggregate",
                                           "temperatures": temps}
        for n in names:
            assert abs(got[f"accuracy_{n}"] - ref[f"accuracy_{n}"]) <= 0.1


@pytest.mark.parametrize("method", ["slcapp", "seqft"])
def test_slca_bundle_exports_with_its_linear_head(work, tmp_path, method):
    """SLCA-family bundles (aligned linear heads, LoRA or a fine-tuned backbone) export and
    evaluate like the bundle, with the alignment they were trained with; the device loop runs
    them and enrolls by that alignment."""
    bundle, eng = tmp_path / "bundle", tmp_path / "engine"
    res = invoke(["train", "--data", str(work["data"]), "--method", method, "--out", str(bundle), *TINY,
                  "--set", "slca.ca_samples_per_class=16"])
    assert res.exit_code == 0, res.output
    assert invoke(["export", str(bundle), "--out", str(eng)]).exit_code == 0
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["learners"]["main"]["head"] == "linear"
    assert manifest["learners"]["main"]["alignment"]["samples_per_class"] == 16  # the bundle's slca.ca_*
    assert json.loads((eng / "parity.json").read_text())["fp32"]["top1_agreement"] == 1.0
    got = json.loads(invoke(["eval", str(eng), "--data", str(work["data"]), "--json"]).stdout)
    ref = json.loads(invoke(["eval", str(bundle), "--data", str(work["data"]), "--json"]).stdout)
    assert abs(got["accuracy"] - ref["accuracy"]) <= 0.1
    listed = invoke(["enroll", str(eng), "--list"])  # the device runs linear heads ...
    assert listed.exit_code == 0 and listed.stdout.count("\t") == manifest["classes"]["count"]
    first = sorted((work["data"] / "val").iterdir())[0]
    ran = invoke(["run", str(eng), "--source", str(first), "--headless", "--store", str(tmp_path / "s")])
    assert ran.exit_code == 0 and json.loads(ran.stdout.strip().splitlines()[-1])["frames"] > 0
    enroll = ["enroll", str(eng), "--name", "new", "--images", str(first), "--store", str(tmp_path / "s")]
    res = invoke(enroll)  # ... and enroll into them (classifier alignment on the device)
    assert res.exit_code == 0 and "committed generation 1" in res.stdout, res.output
    listed = invoke(["enroll", str(eng), "--list", "--store", str(tmp_path / "s")])
    assert listed.stdout.count("\t") == manifest["classes"]["count"] + 1 and "new" in listed.stdout


def test_engine_dir_loads_without_torch(work):
    """The engine directory's heads and manifest are read with numpy only."""
    import subprocess
    code = ("import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
            "from edgecl.device.engine_dir import open_engine_dir\n"
            "import numpy as np\n"
            f"e = open_engine_dir({str(work['engines']['ranpac'])!r})\n"
            "h = e.heads['main']; print(h.kind, h.logits(np.ones((2, h.W_rand.shape[0]), np.float32)).shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ranpac", "(2,", "4)"]


def test_parity_on_generated_images_when_bundle_data_is_gone(work, tmp_path):
    from edgecl.core.formats import BundleManifest
    from edgecl.export.exporter import parity_images
    bundle = BundleManifest.read(work["bundles"]["ranpac"])
    bundle.config["data"]["root"] = str(tmp_path / "gone")
    imgs, source = parity_images(bundle, 32, 6, log=print)
    assert imgs.shape == (6, 32, 32, 3) and imgs.dtype == np.uint8 and source.startswith("generated")


def test_mismatched_engine_dir_is_refused(work, tmp_path):
    eng = tmp_path / "eng"
    shutil.copytree(work["engines"]["simplecil"], eng)
    shutil.copyfile(work["engines"]["ranpac"] / "heads.safetensors", eng / "heads.safetensors")
    res = invoke(["eval", str(eng), "--data", str(work["data"]), "--json"])
    assert res.exit_code == 2 and "heads.safetensors does not match the manifest's hash" in res.output
    (eng / "model.fp32.onnx").unlink()
    res = invoke(["eval", str(eng), "--data", str(work["data"]), "--json"])
    assert res.exit_code == 2 and "Traceback" not in res.output


# ----------------------------------------------------------------------------- INT8

def conv_weights(model) -> list:
    """The quantized initializers that reach a Conv/MatMul/Gemm as its weight (through a DequantizeLinear)."""
    weight_inputs = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    quantized = {n.input[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.output[0] in weight_inputs}
    return [i for i in model.graph.initializer if i.name in quantized]


def test_int8_qdq_export_and_calibration_cache(work, tmp_path):
    import onnx
    out = tmp_path / "int8"
    args = ["export", str(work["bundles"]["ranpac"]), "--out", str(out), "--precision", "int8",
            "--calib-count", "8"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    q = onnx.load(str(out / manifest["models"]["int8"]["file"]))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    # the CPU model's default weights: int8 in 7 bits (plain U8S8 saturates on x86 without VNNI)
    from onnx.numpy_helper import to_array
    weights = conv_weights(q)
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights)
    assert all(-64 <= to_array(i).min() and to_array(i).max() <= 64 for i in weights)  # 7 bits
    assert manifest["models"]["int8"]["weights"] == "int8-7bit-per-channel"
    assert manifest["models"]["int8"]["calibration"]["images"] == 8
    key = json.loads((out / "calibration/ort-minmax.key.json").read_text())
    assert set(key) == {"model_sha256", "data_sha256", "method", "tool", "tool_version"}
    assert "int8" in json.loads((out / "parity.json").read_text())
    res = invoke(["eval", str(out), "--data", str(work["data"]), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["model"] == "model.int8.qdq.onnx"

    again = invoke(args)  # same model, same data: the cache is reused, and says so
    assert again.exit_code == 0 and "key matches, reusing it" in again.output
    changed = invoke(args[:-1] + ["6"])  # other calibration data: stale, recalibrated
    assert changed.exit_code == 0 and "is stale (data_sha256 changed)" in changed.output

    u8 = tmp_path / "int8-u8"  # uint8 weights on request
    assert invoke(args[:3] + [str(u8)] + args[4:] + ["--int8-weights", "u8"]).exit_code == 0
    weights = conv_weights(onnx.load(str(u8 / "model.int8.qdq.onnx")))
    assert weights and all(i.data_type == onnx.TensorProto.UINT8 for i in weights)


def test_calibration_cache_invalidation(tmp_path):
    from edgecl.calibration import CacheKey, CalibrationCache
    logs = []
    key = CacheKey("m" * 64, "d" * 64, "minmax", "onnxruntime", "1.0")
    cache = CalibrationCache(tmp_path, "ort-minmax")
    assert cache.lookup(key, log=logs.append) is None
    cache.store(key, b"ranges")
    assert cache.lookup(key, log=logs.append).read_bytes() == b"ranges"
    for field, value in [("model_sha256", "x" * 64), ("data_sha256", "y" * 64), ("method", "entropy"),
                         ("tool_version", "2.0")]:
        other = CacheKey(**{**key.__dict__, field: value})
        assert cache.lookup(other, log=logs.append) is None
        assert f"stale ({field} changed)" in logs[-1]
    cache.key_path.write_text("garbage")
    assert cache.lookup(key, log=logs.append) is None and "no readable key" in logs[-1]


def test_calibration_reader_round_robin(work):
    from edgecl.calibration import FrameReader, data_sha256, load_calibration_images
    imgs = load_calibration_images(work["data"], 32, 6)  # DIR/train is used
    assert imgs.shape == (6, 32, 32, 3)
    assert data_sha256(imgs) == data_sha256(load_calibration_images(work["data"], 32, 6))
    assert data_sha256(imgs) != data_sha256(load_calibration_images(work["data"], 32, 5))
    reader = FrameReader(imgs, batch_size=4)
    assert [b.shape[0] for b in reader.batches()] == [4, 2] and len(reader) == 2


# ----------------------------------------------------------------------------- TensorRT (faked)

def test_trt_builder_config_and_file_naming_trt10(work, tmp_path, monkeypatch):
    from edgecl.export import tensorrt as trtlib
    fake = make_fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setenv("EDGECL_TRT_DEVICE", "Orin Nano")
    out = tmp_path / "trt"
    res = invoke(["export", str(work["bundles"]["ranpac"]), "--out", str(out), "--trt", "--precision", "fp16",
                  "--batch-range", "1,4,16", "--workspace-mb", "512"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = manifest["engines"]
    onnx_sha = manifest["files"]["model.fp32.onnx"]
    assert entry["file"] == f"model.fp16.trt10.3.0.orin-nano.{onnx_sha[:12]}.plan"
    assert (out / entry["file"]).read_bytes() == b"fake-engine" and entry["file"] in manifest["files"]
    assert (out / "timing.cache").read_bytes() == b"timing;"
    assert ("create_network", 0) in fake.calls  # no EXPLICIT_BATCH flag on 10.x
    assert ("set_shape", "input", (1, 32, 32, 3), (4, 32, 32, 3), (16, 32, 32, 3)) in fake.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 512 << 20) in fake.calls
    assert ("set_flag", "FP16") in fake.calls and ("set_flag", "INT8") not in fake.calls
    assert "trtexec --onnx=model.fp32.onnx" in res.output and "--fp16" in entry["trtexec"]
    assert "--minShapes=input:1x32x32x3" in entry["trtexec"]

    # int8 on TensorRT 10: explicit quantization from a symmetric QDQ model
    fake.calls.clear()
    res = invoke(["export", str(work["bundles"]["ranpac"]), "--out", str(out), "--trt", "--precision", "int8",
                  "--calib-count", "8"])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads((out / "manifest.json").read_text())["engines"]
    assert entry["onnx"] == "model.int8.trt.qdq.onnx" and entry["quantization"] == "explicit-qdq"
    assert entry["file"].startswith("model.int8.trt10.3.0.orin-nano.")
    assert ("set_flag", "INT8") in fake.calls and ("set_flag", "FP16") in fake.calls
    assert not any(c[0] == "calibrator_init" for c in fake.calls)
    # a changed model gets another engine name
    assert trtlib.engine_name("int8", "10.3.0", "x", "a" * 64) != trtlib.engine_name("int8", "10.3.0", "x", "b" * 64)


def test_trt8_int8_entropy_calibrator_and_cache(work, tmp_path, monkeypatch):
    from edgecl.export import tensorrt as trtlib
    fake = make_fake_tensorrt("8.6.1")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setenv("EDGECL_TRT_DEVICE", "xavier")

    class HostBuffer:
        def __init__(self, nbytes):
            self.nbytes = nbytes

        def upload(self, arr):
            assert arr.dtype == np.uint8 and arr.nbytes <= self.nbytes
            return 1234

    monkeypatch.setattr(trtlib, "_DeviceBuffer", HostBuffer)
    out = tmp_path / "trt8"
    args = ["export", str(work["bundles"]["ranpac"]), "--out", str(out), "--trt", "--precision", "int8",
            "--calib-data", str(work["data"]), "--calib-count", "8"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert ("create_network", 1 << 0) in fake.calls and ("set_calibration_profile",) in fake.calls
    assert ("calibration_cache_read", False) in fake.calls
    (entry,) = json.loads((out / "manifest.json").read_text())["engines"]
    assert entry["onnx"] == "model.fp32.onnx" and entry["quantization"] == "implicit-entropy2"
    assert entry["file"].startswith("model.int8.trt8.6.1.xavier.")
    assert (out / "calibration/trt-entropy2.cache").is_file()
    assert "--calib=calibration/trt-entropy2.cache" in entry["trtexec"]
    fake.calls.clear()
    res = invoke(args)  # same model and data: TensorRT gets the cache back
    assert res.exit_code == 0 and ("calibration_cache_read", True) in fake.calls
    fake.calls.clear()
    res = invoke(args[:-1] + ["4"])  # other data: the cache is stale and TensorRT recalibrates
    assert res.exit_code == 0 and ("calibration_cache_read", False) in fake.calls
    assert "is stale (data_sha256 changed)" in res.output


def test_trt_parse_failure_is_one_line(work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("10.0.1", fail_parse=True))
    res = invoke(["export", str(work["bundles"]["simplecil"]), "--out", str(tmp_path / "x"), "--trt"])
    one_line_error(res, "TensorRT cannot parse model.fp32.onnx: fake parse error")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- user errors

def test_export_user_errors(work, tmp_path, monkeypatch):
    bundle = work["bundles"]["simplecil"]
    one_line_error(invoke(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]), "does not exist")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "heads.safetensors").unlink()
    one_line_error(invoke(["export", str(broken), "--out", str(tmp_path / "o")]), "incomplete", "heads.safetensors")
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 99
    (old / "manifest.json").write_text(json.dumps(m))
    one_line_error(invoke(["export", str(old), "--out", str(tmp_path / "o")]), "format version 99")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--precision", "fp16"]),
                   "--precision fp16 needs --trt")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--trt"]), "--trt", "not installed")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--precision", "int8",
                           "--calib-data", str(tmp_path / "missing")]), "--calib-data", "does not exist")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--batch-range", "8,4,2"]),
                   "--batch-range")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "other")]), "not an engine directory")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--accept-rate", "1.5"]),
                   "--accept-rate")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--holdout-per-class", "-1"]),
                   "--holdout-per-class")
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "o"), "--holdout-data",
                           str(tmp_path / "missing")]), "--holdout-data", "not a folder")
    assert not (tmp_path / "o").exists()


def test_export_calibrates_unknown_rejection_on_held_out_images(work, tmp_path):
    """Held-out images (here the training folder itself, for the format's sake) give the engine its
    open_set calibration, bound by the manifest; the device reads it and eval reports on unknowns.
    Without held-out images (the bundle trained on all of them) the export says so."""
    from safetensors.numpy import load_file

    bundle, data = work["bundles"]["ranpac"], work["data"]
    assert "unknown rejection not calibrated: the bundle trained on every training image" in \
        invoke(["export", str(bundle), "--out", str(tmp_path / "plain")]).output
    assert "open_set" not in json.loads((tmp_path / "plain" / "manifest.json").read_text()) or \
        json.loads((tmp_path / "plain" / "manifest.json").read_text())["open_set"] is None
    eng = tmp_path / "eng"
    res = invoke(["export", str(bundle), "--out", str(eng), "--holdout-data", str(data / "train"),
                  "--holdout-per-class", "6", "--accept-rate", "0.9"])
    assert res.exit_code == 0, res.output
    m = json.loads((eng / "manifest.json").read_text())
    op = m["open_set"]
    assert op["score"] == "maxlogit" and op["accept_rate"] == 0.9 and op["images"] == 24 and op["temperature"] > 0
    assert "openset.safetensors" in m["files"] and len(op["platt"]) == 2
    t = load_file(str(eng / "openset.safetensors"))
    assert t["features.main"].dtype == np.float16 and t["features.main"].shape[0] == 24
    assert sorted(set(t["labels"].tolist())) == [0, 1, 2, 3]
    unknown = make_imagefolder(tmp_path / "unk", n_classes=2, n_train=1, n_val=3, seed=9)
    for d in (unknown / "val").iterdir():
        d.rename(d.with_name("stranger-" + d.name))
    res = invoke(["eval", str(eng), "--data", str(data), "--unknown-data", str(unknown), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["open_set"]["unknown"] == 6 and got["open_set"]["target_accept_rate"] == 0.9
    assert 0 <= got["ece"] <= 1


@pytest.mark.trt
def test_real_tensorrt_engine(work, tmp_path):
    pytest.importorskip("tensorrt")
    out = tmp_path / "real"
    res = invoke(["export", str(work["bundles"]["ranpac"]), "--out", str(out), "--trt", "--precision", "fp16"])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads((out / "manifest.json").read_text())["engines"]
    assert (out / entry["file"]).stat().st_size > 0 and (out / "timing.cache").is_file()
