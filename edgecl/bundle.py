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

import os
import shutil
from pathlib import Path
from typing import Optional

from .core.durable import publish_dir, read_manifest_json, sha256_file, write_json_durable
from .core.errors import EdgeclError

FORMAT = "edgecl-bundle"
FORMAT_VERSION = 1
TENSOR_FILES = ("backbone", "pet", "heads", "stats")


def write_bundle(out: Path, manifest: dict, tensors: dict, extra_files: Optional[dict] = None) -> Path:
    """Write ``tensors`` ({stem: {name: Tensor}}), ``extra_files`` ({name: bytes | source Path})
    and the manifest (with every file's sha256 added) atomically to ``out``."""
    from safetensors.torch import save_file

    out = Path(out).resolve()
    if out.exists() and not (out / "manifest.json").is_file():
        raise EdgeclError(f"--out {out} exists and is not an edgecl bundle; choose another path or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
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
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    write_json_durable(tmp / "manifest.json", manifest)
    publish_dir(tmp, out)
    return out


def read_manifest(path: Path) -> dict:
    return read_manifest_json(path, FORMAT, FORMAT_VERSION, "bundle", "re-run edgecl train")


def read_bundle(path: Path, verify: bool = True) -> tuple:
    """Load a bundle: (manifest, {stem: {name: Tensor}}). Missing or altered files are refused."""
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    tensors = {}
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise EdgeclError(f"bundle {path} is incomplete: {name} is missing")
        if verify and sha256_file(file) != digest:
            raise EdgeclError(f"bundle {path}: {name} does not match the manifest's hash; "
                              "the bundle is damaged or was edited")
        if name.endswith(".safetensors"):
            tensors[name[: -len(".safetensors")]] = load_file(str(file))
    if "backbone" not in tensors:
        raise EdgeclError(f"bundle {path} is incomplete: backbone.safetensors is missing")
    return manifest, tensors
