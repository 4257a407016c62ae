"""The engine directory written by ``edgecl export``: reading and verifying it, torch-free.

Layout (``manifest.json`` binds everything by sha256)::

    manifest.json          format "edgecl-engine", version, input contract, learners, models
    model.fp32.onnx        the graph: uint8 NHWC frame (BGR) -> features_<learner> per learner
    model.int8.qdq.onnx    (int8) ONNX Runtime static-quantized QDQ graph
    heads.safetensors      per learner "<learner>.<tensor>": ranpac.W / ranpac.W_rand,
                           prototypes.sums / prototypes.counts, or linear.weight / linear.bias
    stats.safetensors      per learner "<learner>.<tensor>": ranpac.G / ranpac.Q / ranpac.counts (enrollment)
    classes.json           class names in logit order
    parity.json            ONNX Runtime vs PyTorch report of the export
    calibration/           INT8 calibration caches with their keys
    *.plan, timing.cache   TensorRT engines (names carry precision, TensorRT version, device and
                           the ONNX hash) and the builder's timing cache (not bound)

Only numpy (and safetensors' numpy API) is needed to read it.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgecl.core.durable import read_manifest_json, sha256_file
from edgecl.core.errors import EdgeclError

FORMAT = "edgecl-engine"
FORMAT_VERSION = 1


def is_engine_dir(path) -> bool:
    mf = Path(path) / "manifest.json"
    if not mf.is_file():
        return False
    try:
        return json.loads(mf.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def read_manifest(path) -> dict:
    return read_manifest_json(path, FORMAT, FORMAT_VERSION, "engine directory",
                              f"create it with edgecl export BUNDLE --out {path}")


def verify(path, manifest: dict, names=None) -> None:
    """Refuse a missing file or one whose sha256 differs from the manifest's (``names``: the
    files to check, default all bound files)."""
    path = Path(path)
    files = manifest.get("files", {})
    for name in (names if names is not None else files):
        if name not in files:
            raise EdgeclError(f"engine directory {path}: {name} is not bound by its manifest; re-run edgecl export")
        f = path / name
        if not f.is_file():
            raise EdgeclError(f"engine directory {path} is incomplete: {name} is missing; re-run edgecl export")
        if sha256_file(f) != files[name]:
            raise EdgeclError(f"engine directory {path}: {name} does not match the manifest's hash (the parts are "
                              f"mismatched or were edited); re-run edgecl export")


def default_precision(manifest: dict) -> str:
    """The ONNX model an engine directory runs by default: the precision it was exported for,
    or fp32 when that has no ONNX model of its own (an fp16 TensorRT export runs its fp32 ONNX
    outside TensorRT)."""
    precision = manifest.get("precision", "fp32")
    return precision if precision in manifest.get("models", {}) else "fp32"


def model_file(manifest: dict, precision: str | None = None) -> str:
    """The ONNX file of ``precision`` (default :func:`default_precision`); an explicit precision
    the directory lacks is refused."""
    precision = precision or default_precision(manifest)
    models = manifest.get("models", {})
    if precision not in models:
        raise EdgeclError(f"the engine directory has no {precision} ONNX model (it has: {', '.join(models)}); "
                          f"export with --precision {precision}")
    return models[precision]["file"]


def load_tensors(path, manifest: dict, stem: str) -> dict:
    """{learner: {tensor name: ndarray}} from ``heads`` / ``stats``."""
    from safetensors.numpy import load_file

    name = f"{stem}.safetensors"
    if name not in manifest.get("files", {}):
        return {ln: {} for ln in manifest["learners"]}
    flat = load_file(str(Path(path) / name))
    out = {ln: {} for ln in manifest["learners"]}
    for key, value in flat.items():
        learner, _, rest = key.partition(".")
        if learner in out:
            out[learner][rest] = value
    return out


def load_heads(path, manifest: dict) -> dict:
    from .heads import Head

    tensors = load_tensors(path, manifest, "heads")
    return {ln: Head(info["head"], tensors[ln]) for ln, info in manifest["learners"].items()}


def class_names(path, manifest: dict) -> list:
    return json.loads((Path(path) / "classes.json").read_text())


def open_engine_dir(path, verify_files: bool = True) -> dict:
    """Read and verify: ``{"manifest", "heads": {learner: Head}, "classes": [...]}``."""
    manifest = read_manifest(path)
    if verify_files:
        verify(path, manifest)
    heads = load_heads(path, manifest)
    classes = class_names(path, manifest)
    for ln, head in heads.items():
        if head.num_classes != len(classes):
            raise EdgeclError(f"engine directory {path}: learner {ln}'s head has {head.num_classes} classes but "
                              f"classes.json names {len(classes)}; re-run edgecl export")
    return {"manifest": manifest, "heads": heads, "classes": classes}
