"""The engine directory written by ``edgecl export``: reading and verifying it, torch-free.

Layout (``manifest.json``, an :class:`edgecl.core.formats.EngineManifest`, binds everything by
sha256)::

    manifest.json          format "edgecl-engine", version, input contract, learners (SLCA family: the
                           classifier alignment the head was trained with), models
    model.fp32.onnx        the graph: uint8 NHWC frame (BGR) -> features_<learner> per learner
    model.int8.qdq.onnx    (int8) ONNX Runtime static-quantized QDQ graph
    heads.safetensors      per learner "<learner>.<kind>.<tensor>": ranpac.W / ranpac.W_rand,
                           prototypes.sums / prototypes.counts, or linear.weight / linear.bias /
                           linear.blocks and stage1.* (the heads before alignment)
    stats.safetensors      per learner "<learner>.<kind>.<tensor>": ranpac.G / ranpac.Q / ranpac.counts
                           (enrollment); SLCA family: classstats.* (each class's Gaussian)
    openset.safetensors    held-out training images' features per learner ("features.<learner>", float16)
                           and engine classes ("labels"): the unknown threshold (edgecl.device.openset)
    classes.json           class names in logit order
    parity.json            ONNX Runtime vs PyTorch report of the export
    calibration/           INT8 calibration caches with their keys
    *.plan, timing.cache   TensorRT engines (names carry precision, TensorRT version, device and
                           the ONNX hash) and the builder's timing cache (not bound)
    store/                 what the device learned since (edgecl.device.store; never bound)

Only numpy (and safetensors' numpy API) is needed to read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecl.core.durable import sha256_file
from edgecl.core.errors import EdgeclError
from edgecl.core.formats import EngineManifest, engine_fix, load_tensor_file, manifest_format, split_learner, unpack

from .heads import head_class, load_head


def is_engine_dir(path) -> bool:
    return manifest_format(path) == EngineManifest.FORMAT


def read_manifest(path) -> EngineManifest:
    return EngineManifest.read(path)


def verify(path, manifest: EngineManifest, names=None) -> None:
    """Refuse a missing file or one whose sha256 differs from the manifest's (``names``: the
    files to check, default all bound files)."""
    path = Path(path)
    files = manifest.files
    for name in (names if names is not None else files):
        if name not in files:
            raise EdgeclError(f"engine directory {path}: {name} is not bound by its manifest; {engine_fix(path)}")
        f = path / name
        if not f.is_file():
            raise EdgeclError(f"engine directory {path} is incomplete: {name} is missing; {engine_fix(path)}")
        if sha256_file(f) != files[name]:
            raise EdgeclError(f"engine directory {path}: {name} does not match the manifest's hash (the parts are "
                              f"mismatched or were edited); {engine_fix(path)}")


def load_tensors(path, manifest: EngineManifest, stem: str) -> dict:
    """{learner: {"<kind>.<name>": ndarray}} from ``heads`` / ``stats`` ({} per learner when the
    directory has no such file)."""
    from safetensors.numpy import load_file

    name = f"{stem}.safetensors"
    if name not in manifest.files:
        return {ln: {} for ln in manifest.learners}
    flat = load_tensor_file(load_file, Path(path) / name, f"engine directory {path}", engine_fix(path))
    return split_learner(flat, list(manifest.learners))


def load_tensor_names(path, manifest: EngineManifest, stem: str, names: list) -> dict:
    """Only the tensors ``names`` (flat, ``<learner>.<kind>.<name>``) of ``stem.safetensors``, those
    present: small statistics (Q, counts) without reading G."""
    from safetensors import safe_open

    file = f"{stem}.safetensors"
    if file not in manifest.files:
        return {}

    def load(p):
        with safe_open(p, framework="numpy") as f:
            keys = set(f.keys())
            return {k: f.get_tensor(k) for k in names if k in keys}

    return load_tensor_file(load, Path(path) / file, f"engine directory {path}", engine_fix(path))


def load_open_set(path, manifest: EngineManifest):
    """The unknown-rejection calibration (:class:`~edgecl.device.openset.Calibration`) of the
    directory, None when it was exported without one."""
    from safetensors.numpy import load_file

    from .openset import Calibration

    cal = manifest.open_set
    if cal is None:
        return None
    if cal.file not in manifest.files:
        raise EdgeclError(f"engine directory {path}: the manifest's open_set names {cal.file}, which it does not "
                          f"bind; {engine_fix(path)}")
    t = load_tensor_file(load_file, Path(path) / cal.file, f"engine directory {path}", engine_fix(path))
    feats = {ln: t.get(f"features.{ln}") for ln in manifest.learners}
    if any(f is None for f in feats.values()) or "labels" not in t:
        raise EdgeclError(f"engine directory {path}: {cal.file} lacks the held-out features of a learner; "
                          f"{engine_fix(path)}")
    return Calibration(cal.score, float(cal.accept_rate), float(cal.temperature), tuple(cal.platt), feats,
                       np.asarray(t["labels"], np.int64))


def load_heads(path, manifest: EngineManifest) -> dict:
    """{learner: :class:`~edgecl.device.heads.Head`} through the head registry."""
    tensors = load_tensors(path, manifest, "heads")

    def own(ln: str, kind: str) -> dict:  # the head's tensors, and those of the groups it also reads
        out = unpack(tensors[ln], kind)
        for group in head_class(kind, f"engine directory {path}, learner {ln!r}").groups:
            out.update({f"{group}.{k}": v for k, v in unpack(tensors[ln], group).items()})
        return out

    return {ln: load_head(info.head, own(ln, info.head), f"engine directory {path}, learner {ln!r}", info)
            for ln, info in manifest.learners.items()}


def class_names(path, manifest: EngineManifest) -> list:
    f = Path(path) / manifest.classes.file
    try:
        names = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeclError(f"engine directory {path}: {manifest.classes.file} cannot be read ({exc}); "
                          f"{engine_fix(path)}") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise EdgeclError(f"engine directory {path}: {manifest.classes.file} is not a list of class names; "
                          f"{engine_fix(path)}")
    return names


@dataclass
class EngineDir:
    path: Path
    manifest: EngineManifest
    heads: dict
    classes: list


def open_engine_dir(path, verify_files: bool = True) -> EngineDir:
    """Read and verify an engine directory: its manifest, heads (through the registry) and classes."""
    manifest = read_manifest(path)
    if verify_files:
        verify(path, manifest)
    heads = load_heads(path, manifest)
    classes = class_names(path, manifest)
    for ln, head in heads.items():
        if head.num_classes != len(classes):
            raise EdgeclError(f"engine directory {path}: learner {ln}'s head has {head.num_classes} classes but "
                              f"{manifest.classes.file} names {len(classes)}; {engine_fix(path)}")
    return EngineDir(Path(path), manifest, heads, classes)
