"""The run bundle: a directory written atomically by ``edgecl train`` (docs/DESIGN.md, "Artifact formats").

    manifest.json        format/version, backbone and its weights' hash, input size and
                         normalisation, class names and order, method, PET config, learner
                         facts (feature sizes, RanPAC seed/M/lambda), resolved config, file hashes
    config.yaml          the resolved configuration, for people
    backbone.safetensors the frozen pretrained backbone (PET not applied), so the bundle alone
                         reproduces the run
    pet.safetensors      PET weights (when the method trains PET)
    heads.safetensors    classifier heads (prototypes, W_rand and ridge W, ...)
    stats.safetensors    class statistics (G, Q, ...)
    metrics.json, accuracy.png

The directory is assembled under a temporary name beside the target, every file fsynced, and
renamed into place; a bundle therefore exists whole or not at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from .core.durable import publish_dir, sha256_file, staging_dir, write_json_durable
from .core.errors import EdgeclError
from .core.formats import (
    BUNDLE_FIX,
    BundleManifest,
    EngineManifest,
    check_output_path,
    load_tensor_file,
    manifest_format,
)

TENSOR_FILES = ("backbone", "pet", "heads", "stats")


def check_bundle_out(out, method: str, force: bool = False) -> None:
    """Refuse ``--out`` before training when writing the bundle there would destroy something: a
    directory that is not a run bundle (an engine directory in particular), a path inside an
    engine directory, or a bundle of another method (unless ``force``)."""
    out = Path(out).expanduser().resolve()
    fmt = manifest_format(out)
    if out.exists() and fmt != BundleManifest.FORMAT:
        what = "an engine directory" if fmt == EngineManifest.FORMAT else "not an edgecl bundle"
        raise EdgeclError(f"--out {out} exists and is {what}; it is not replaced: choose another path")
    check_output_path(out, "--out", parent_must_exist=False)
    if fmt == BundleManifest.FORMAT and not force:
        try:
            other = BundleManifest.read(out).method
        except EdgeclError:
            other = None
        if other != method:
            raise EdgeclError(f"--out {out} holds a {other or 'damaged'} bundle; training {method} would replace it: "
                              f"choose another path or pass --force")


def write_bundle(out: Path, manifest: BundleManifest, tensors: dict, extra_files: Optional[dict] = None) -> Path:
    """Write ``tensors`` ({stem: {name: Tensor}}), ``extra_files`` ({name: bytes | source Path})
    and the manifest (with every file's sha256 added) atomically to ``out``."""
    from safetensors.torch import save_file

    out = Path(out).resolve()
    if out.exists() and manifest_format(out) != BundleManifest.FORMAT:
        what = "an engine directory" if manifest_format(out) == EngineManifest.FORMAT else "not an edgecl bundle"
        raise EdgeclError(f"--out {out} exists and is {what}; it is not replaced: choose another path")
    with staging_dir(out) as tmp:
        files = {}
        for stem, group in tensors.items():
            if not group:
                continue
            name = f"{stem}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / name))
            files[name] = None
        for name, content in (extra_files or {}).items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_bytes(content if isinstance(content, bytes) else str(content).encode())
            files[name] = None
        for name in files:
            files[name] = sha256_file(tmp / name)
        manifest.files = files
        write_json_durable(tmp / "manifest.json", manifest.to_json())
        publish_dir(tmp, out)
    return out


def read_bundle(path: Path, verify: bool = True) -> tuple:
    """Load a bundle: (:class:`BundleManifest`, {stem: {name: Tensor}}). Missing or altered files
    are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = BundleManifest.read(path)
    tensors = {}
    for name, digest in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise EdgeclError(f"bundle {path} is incomplete: {name} is missing")
        if verify and sha256_file(file) != digest:
            raise EdgeclError(f"bundle {path}: {name} does not match the manifest's hash; "
                              "the bundle is damaged or was edited")
        if name.endswith(".safetensors"):
            tensors[name[: -len(".safetensors")]] = load_tensor_file(load_file, file, f"bundle {path}", BUNDLE_FIX)
    if "backbone" not in tensors:
        raise EdgeclError(f"bundle {path} is incomplete: backbone.safetensors is missing")
    return manifest, tensors
