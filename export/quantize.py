"""ONNX Runtime static quantization of the exported graph to a QDQ model (INT8, CPU-tested).

Flavours:

* for ONNX Runtime on the CPU (``model.int8.qdq.onnx``), uint8 activations and per-channel
  weights, ``cpu_weights``:
  - ``"s8-7bit"`` (default): int8 weights in 7 bits (``reduce_range``). Plain U8S8 multiplies
    uint8 by int8 with ``vpmaddubsw`` on x86 CPUs without VNNI, whose int16 pair sums saturate:
    on this machine (AVX2, no VNNI) U8S8 EfficientNet-Lite0 features had a cosine of 0.95 to
    fp32 and 82% top-1 agreement; 7-bit weights leave headroom (0.976, 88%; quick RanPAC
    bundle 62.52 vs 63.28 fp32) and keep ONNX Runtime's fast integer kernels (faster than fp32).
  - ``"u8"``: uint8 weights ("U8U8"): the closest to fp32 (0.992, 92%; 63.20 vs 63.28), but
    ONNX Runtime has no fast x86 kernel for per-channel uint8 weights: ~5x slower than fp32.
  docs/EXPORT.md has the measurements.
* for TensorRT's explicit quantization (``symmetric_activations=True``): int8 symmetric
  activations and int8 symmetric per-channel weights, what TensorRT 10 consumes.

Calibration ranges come from ``FrameReader`` batches and are cached in a
:class:`edgecl.calibration.CalibrationCache` under the key (fp32 model hash, data hash,
method, onnxruntime version).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Callable

from edgecl.calibration import CacheKey, CalibrationCache, FrameReader, data_sha256
from edgecl.device.engine_dir import sha256_file

METHODS = ("minmax", "entropy", "percentile")


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def stem_nodes(path) -> list:
    """Names of the first compute nodes (Conv/MatMul/Gemm) reached from the graph input, one per
    learner: the stem convolution sees the normalised image, and quantizing it (per-tensor 8-bit
    activations right after the in-graph preprocessing) cost EfficientNet-Lite0 features a cosine
    of 0.85; they stay in float (the usual first-layer exception)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stems, seen, todo = [], set(), [i.name for i in model.graph.input]
    while todo:
        tensor = todo.pop()
        for node in consumers.get(tensor, []):
            key = node.name or id(node)
            if key in seen:
                continue
            seen.add(key)
            if node.op_type in ("Conv", "MatMul", "Gemm"):
                stems.append(node.name)
            else:
                todo.extend(node.output)
    return stems


CPU_WEIGHTS = ("s8-7bit", "u8")


def quantize_qdq(fp32_path, out_path, frames, cache_dir, method: str = "minmax", symmetric_activations: bool = False,
                 cpu_weights: str = "s8-7bit", input_name: str = "input", op_types=None, log: Callable = print) -> dict:
    """Quantize ``fp32_path`` to ``out_path``; returns facts for the manifest (key, cache hit)."""
    import onnxruntime
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    key = CacheKey(model_sha256=sha256_file(fp32_path), data_sha256=data_sha256(frames), method=method,
                   tool="onnxruntime", tool_version=onnxruntime.__version__)
    cache = CalibrationCache(cache_dir, f"ort-{method}")
    hit = cache.lookup(key, log=log)
    reader = FrameReader(frames, input_name)
    supports_cache = "calibration_cache_path" in inspect.signature(quantize_static).parameters
    with tempfile.TemporaryDirectory(prefix="edgecl-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        ranges = Path(tmp) / "ranges.json"
        if hit is not None and supports_cache:
            ranges.write_bytes(hit.read_bytes())
        exclude = stem_nodes(pre)
        u8_weights = cpu_weights == "u8" and not symmetric_activations
        kwargs = dict(nodes_to_exclude=exclude, op_types_to_quantize=op_types, quant_format=QuantFormat.QDQ,
                      per_channel=True,
                      reduce_range=cpu_weights == "s8-7bit" and not symmetric_activations,
                      activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                      weight_type=QuantType.QUInt8 if u8_weights else QuantType.QInt8,
                      calibrate_method=_ort_method(method),
                      extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": not u8_weights})
        if supports_cache:
            kwargs["calibration_cache_path"] = str(ranges)
        quantize_static(str(pre), str(out_path), reader, **kwargs)
        if supports_cache and hit is None and ranges.is_file():
            cache.store(key, source=ranges)
    return {"calibration": {"method": method, "images": int(len(frames)), "key": key.__dict__,
                            "cache": f"calibration/{cache.path.name}" if supports_cache else None,
                            "cache_reused": hit is not None and supports_cache},
            "float_nodes": exclude, "activations": "int8-symmetric" if symmetric_activations else "uint8",
            "weights": "int8-symmetric-per-channel" if symmetric_activations else
            {"u8": "uint8-per-channel", "s8-7bit": "int8-7bit-per-channel"}[cpu_weights]}
