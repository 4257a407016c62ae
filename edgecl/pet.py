"""Parameter-efficient tuning (PET) modules injected into timm backbones.

Four kinds, chosen by :class:`edgecl.config.PETConfig` ``kinds``, each declared once as a
:class:`PETKind` in :data:`PET_KINDS` (its wrapper, where it goes, how it wraps, whether it
folds):

* ``ssf``: scale and shift of features (Lian et al., "Scaling & Shifting Your Features",
  NeurIPS 2022); folds exactly into the wrapped Linear / Conv / norm layer.
* ``lora``: low-rank update of Linear / 1x1 Conv2d weights (Hu et al., "LoRA", 2021);
  folds exactly into the wrapped weight.
* ``adapter``: AdaptFormer-style parallel bottleneck (Chen et al., NeurIPS 2022); stays
  in the graph.
* ``vpt``: deep visual prompt tuning (Jia et al., ECCV 2022), ViT only; stays in the graph.

Wrappers keep the wrapped module as ``.base`` (state-dict keys gain ``.base.``; load
backbone weights *before* :func:`inject_pet`) and forward unknown attribute reads
(``weight``, ``in_channels``, ``out_features``...) to it, so timm code that inspects
layers keeps working. Injection is the identity at init for ssf, lora and adapter.
:func:`fold_pet` removes the ssf/lora wrappers again; folding an SSF into a Conv2d that
had no bias (every EfficientNet conv: they are followed by BatchNorm) creates that bias.

The model remembers its config as ``model._edgecl_pet_cfg`` (set by :func:`inject_pet`);
:func:`pet_parameters` and friends read it, or take ``cfg=`` explicitly.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from edgecl.config import PETConfig
from edgecl.core.errors import EdgeclError

_NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class _Wrapper(nn.Module):
    """Base of the PET wrappers: holds ``base`` and forwards unknown attributes to it."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "base" not in modules:
                raise
            return getattr(modules["base"], name)

    def pet_named_parameters(self):
        """The wrapper's own (trainable) parameters, not those of the wrapped module."""
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base.")]


def _plain(m: nn.Module) -> nn.Module:
    while isinstance(m, _Wrapper):
        m = m.base
    return m


def _is_layernorm2d(m) -> bool:
    try:
        from timm.layers import LayerNorm2d
    except ImportError:  # pragma: no cover - old timm
        return False
    return isinstance(m, LayerNorm2d)


def _ssf_channels(m: nn.Module):
    """(channels, channel dim of the output) for an SSF-foldable module, else None."""
    m = _plain(m)
    if isinstance(m, nn.Linear):
        return m.out_features, -1
    if isinstance(m, _ConvNd) and not m.transposed:
        return m.out_channels, 1
    if _is_layernorm2d(m):
        return m.normalized_shape[0], 1
    if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
        return m.normalized_shape[0], -1
    if isinstance(m, _BatchNorm):  # BatchNormAct2d with an activation/drop cannot absorb SSF
        if any(not isinstance(getattr(m, a, nn.Identity()), nn.Identity) for a in ("act", "drop")):
            return None
        return m.num_features, 1
    return None


def _lora_ok(m: nn.Module) -> bool:
    m = _plain(m)
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1
            and m.padding_mode == "zeros")


def _set_bias(m: nn.Module, bias: torch.Tensor) -> None:
    if isinstance(getattr(m, "bias", None), nn.Parameter):
        m.bias.copy_(bias)
    else:
        m.bias = nn.Parameter(bias.clone(), requires_grad=m.weight.requires_grad)


class SSF(_Wrapper):
    """Scale-and-shift features, y = gamma * m(x) + beta per output channel
    (Lian et al., NeurIPS 2022); gamma=1, beta=0 at init. Channel dim is 1 for conv /
    BatchNorm / LayerNorm2d outputs, the last dim for Linear / LayerNorm outputs."""

    def __init__(self, base: nn.Module):
        super().__init__()
        info = _ssf_channels(base)
        if info is None:
            raise TypeError(f"SSF cannot wrap {type(base).__name__}")
        n, self.channel_dim = info
        ref = next(base.parameters(), torch.empty(0))
        self.base = base
        self.gamma = nn.Parameter(torch.ones(n, device=ref.device, dtype=ref.dtype))
        self.beta = nn.Parameter(torch.zeros(n, device=ref.device, dtype=ref.dtype))

    def forward(self, x):
        y = self.base(x)
        if self.channel_dim == 1:
            shape = (-1,) + (1,) * (y.dim() - 2)
            return y * self.gamma.view(shape) + self.beta.view(shape)
        return y * self.gamma + self.beta

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Return the wrapped module with gamma/beta absorbed into its weights."""
        m = self.base.fold() if isinstance(self.base, _foldable_types()) else self.base
        g, b = self.gamma.detach(), self.beta.detach()
        if isinstance(m, (_ConvNd, nn.Linear)):
            m.weight.mul_(g.view((-1,) + (1,) * (m.weight.dim() - 1)))
            _set_bias(m, g * m.bias + b if m.bias is not None else b)
            return m
        if m.weight is None:  # norm without affine: create it
            m.weight = nn.Parameter(torch.ones_like(g), requires_grad=False)
            m.bias = nn.Parameter(torch.zeros_like(g), requires_grad=False)
            if isinstance(m, _BatchNorm):
                m.affine = True
            else:
                m.elementwise_affine = True
        m.weight.mul_(g)
        _set_bias(m, g * m.bias + b if m.bias is not None else b)
        return m


class LoRA(_Wrapper):
    """Low-rank adaptation, y = m(x) + (alpha / r) * B(A(x)) for a Linear or 1x1 Conv2d
    (groups=1); B zero at init (Hu et al., 2021). ``init``: ``kaiming`` (A Kaiming-uniform, the
    LoRA paper) or ``svd`` (A = the top-r right singular vectors of the wrapped weight, SLCA++'s
    code: ``init_lora`` in convs/vits.py; rows beyond the weight's rank stay Kaiming)."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float = 4.0, init: str = "kaiming"):
        super().__init__()
        if not _lora_ok(base):
            raise TypeError(f"LoRA needs a Linear or 1x1 Conv2d with groups=1, got {type(base).__name__}")
        if rank < 1:
            raise ValueError("LoRA rank must be >= 1")
        self.base = base
        m = _plain(base)
        kw = dict(bias=False, device=m.weight.device, dtype=m.weight.dtype)
        if isinstance(m, nn.Linear):
            self.A, self.B = nn.Linear(m.in_features, rank, **kw), nn.Linear(rank, m.out_features, **kw)
        else:  # same stride/padding as the 1x1 conv (timm Conv2dSame pads 0 for a 1x1 kernel)
            pad = 0 if isinstance(m.padding, str) or type(m).__name__ == "Conv2dSame" else m.padding
            self.A = nn.Conv2d(m.in_channels, rank, 1, stride=m.stride, padding=pad, **kw)
            self.B = nn.Conv2d(rank, m.out_channels, 1, **kw)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        if init == "svd":
            with torch.no_grad():
                w = m.weight.detach().flatten(1).double()  # [out, in]
                vh = torch.linalg.svd(w, full_matrices=False)[2]
                k = min(rank, vh.shape[0])
                self.A.weight[:k].copy_(vh[:k].to(self.A.weight.dtype).view_as(self.A.weight[:k]))
        elif init != "kaiming":
            raise ValueError(f"LoRA init must be kaiming or svd, got {init!r}")
        nn.init.zeros_(self.B.weight)
        self.rank, self.scale = rank, alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * self.B(self.A(x))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        """Return the wrapped module with W + scale * B @ A."""
        m = self.base.fold() if isinstance(self.base, _foldable_types()) else self.base
        delta = self.B.weight.flatten(1).double() @ self.A.weight.flatten(1).double()
        m.weight.add_((self.scale * delta).to(m.weight.dtype).view_as(m.weight))
        return m


class Adapter(_Wrapper):
    """AdaptFormer bottleneck adapter (Chen et al., NeurIPS 2022); ``up`` zero-init so the
    injection is the identity at start. ``mode="parallel"`` (ViT, wraps ``block.mlp``):
    y = mlp(x) + s * up(ReLU(down(x))) with Linear layers on the last dim.
    ``mode="sequential"`` (CNN blocks): y = block(x); y + s * up(ReLU(down(y))) with 1x1 convs."""

    def __init__(self, base: nn.Module, channels: int, bottleneck: int = 16, scale: float = 0.1,
                 mode: str = "parallel"):
        super().__init__()
        if mode not in ("parallel", "sequential"):
            raise ValueError(f"Adapter mode must be parallel or sequential, got {mode!r}")
        ref = next(base.parameters(), torch.empty(0))
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.base, self.mode, self.scale = base, mode, scale
        if mode == "parallel":
            self.down, self.up = nn.Linear(channels, bottleneck, **kw), nn.Linear(bottleneck, channels, **kw)
        else:
            self.down, self.up = nn.Conv2d(channels, bottleneck, 1, **kw), nn.Conv2d(bottleneck, channels, 1, **kw)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        if self.mode == "parallel":
            return self.base(x) + self.scale * self.up(F.relu(self.down(x)))
        y = self.base(x)
        return y + self.scale * self.up(F.relu(self.down(y)))


class DeepVPT(_Wrapper):
    """Deep visual prompt tuning (Jia et al., ECCV 2022) for one timm ViT block: inserts
    ``num_tokens`` learnable prompts after the prefix (cls/reg) tokens, runs the block and
    strips the prompt positions again (equivalent to VPT-deep's per-layer prompt replacement).
    Attention masks passed to the block are not extended to the prompt tokens."""

    def __init__(self, base: nn.Module, num_tokens: int, dim: int, num_prefix_tokens: int = 1,
                 init_range: float = 0.02):
        super().__init__()
        if num_tokens < 1:
            raise ValueError("DeepVPT needs num_tokens >= 1")
        ref = next(base.parameters(), torch.empty(0))
        self.base = base
        self.num_tokens, self.num_prefix_tokens = num_tokens, num_prefix_tokens
        self.prompts = nn.Parameter(torch.empty(num_tokens, dim, device=ref.device, dtype=ref.dtype)
                                    .uniform_(-init_range, init_range))

    def forward(self, x, *args, **kwargs):
        p, n = self.num_prefix_tokens, self.num_tokens
        prompts = self.prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        y = self.base(torch.cat([x[:, :p], prompts, x[:, p:]], dim=1), *args, **kwargs)
        return torch.cat([y[:, :p], y[:, p + n:]], dim=1)


# ----------------------------------------------------------------------------- the kinds

@dataclass(frozen=True)
class PETKind:
    """One PET kind, declared once. ``wrapper``: its module class; ``order``: injection order
    (lower wraps first, so it ends up innermost: LoRA inside SSF); ``foldable``: ``wrapper.fold()``
    returns the plain module with the PET absorbed (export folds it away; otherwise it stays in
    the graph); ``targets(model, cfg, arch)``: qualified names of the modules it wraps in the bare
    model; ``wrap(module, model, cfg, arch)``: the wrapper around one of them; ``check(cfg)``:
    validates the kind's options."""

    name: str
    wrapper: type
    order: int
    foldable: bool
    targets: Callable
    wrap: Callable
    check: Callable = lambda cfg: None


PET_KINDS: dict = {}
KINDS = PET_KINDS  # the kind names (iterate / ``in``)


def register_pet(kind: PETKind) -> PETKind:
    PET_KINDS[kind.name] = kind
    return kind


def _pet_types() -> tuple:
    return tuple(k.wrapper for k in PET_KINDS.values())


def _foldable_types() -> tuple:
    return tuple(k.wrapper for k in PET_KINDS.values() if k.foldable)


def _positive(option: str, value: int) -> None:
    if value < 1:
        raise EdgeclError(f"pet.{option} must be >= 1, got {value}")


# ----------------------------------------------------------------------------- injection

def _arch(model: nn.Module) -> str:
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.vision_transformer import VisionTransformer
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, (EfficientNet, MobileNetV3)):
        return "effnet"
    return "generic"


def _classifier_ids(model: nn.Module) -> set:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    return {id(m) for m in head.modules()}


def _cnn_blocks(model: nn.Module) -> list:
    return [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]


def _modules(model: nn.Module) -> list:
    head = _classifier_ids(model)
    return [(n, m) for n, m in model.named_modules() if n and id(m) not in head]


def _layer_targets(model: nn.Module, kind: str, regexes: list, ok: Callable, auto_leaf: dict,
                   generic_ok: Callable, arch: str) -> list:
    """Modules ``ok`` accepts whose names match one of ``regexes`` (``pet.<kind>_targets``), or
    by default those whose names match the architecture's leaf pattern in ``auto_leaf``."""
    mods = _modules(model)
    if regexes:
        try:
            pats = [re.compile(r) for r in regexes]
        except re.error as e:
            raise EdgeclError(f"pet.{kind}_targets: bad regex ({e})") from None
        names = [n for n, m in mods if ok(m) and any(p.search(n) for p in pats)]
        if not names:
            raise EdgeclError(f"pet.{kind}_targets {regexes} matched no module {kind} can wrap")
        return names
    if arch not in auto_leaf:
        ok, leaf = generic_ok, re.compile(".")
    else:
        leaf = re.compile(auto_leaf[arch])
    return [n for n, m in mods if ok(m) and leaf.search(n)]


def _any_layer(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (isinstance(m, _ConvNd) and not m.transposed)


def _ssf_targets(model, cfg, arch) -> list:
    return _layer_targets(model, "ssf", cfg.ssf_targets, lambda m: _ssf_channels(m) is not None,
                          {"vit": ".", "effnet": r"(^|\.)conv_(stem|dw|pw|pwl|head)$"}, _any_layer, arch)


def _lora_targets(model, cfg, arch) -> list:
    return _layer_targets(model, "lora", cfg.lora_targets, _lora_ok,
                          {"vit": r"(^|\.)attn\.qkv$", "effnet": r"(^|\.)conv_(pw|pwl|head)$"}, _lora_ok, arch)


def _adapter_targets(model, cfg, arch) -> list:
    if arch == "vit":
        return [f"blocks.{i}.mlp" for i in range(len(model.blocks))]
    if arch == "effnet":
        return _cnn_blocks(model)
    raise EdgeclError(f"pet.kinds: 'adapter' supports timm VisionTransformer and EfficientNet/"
                      f"MobileNetV3 backbones, not {type(model).__name__}")


def _vpt_targets(model, cfg, arch) -> list:
    if arch != "vit":
        raise EdgeclError(f"pet.kinds: 'vpt' needs a timm VisionTransformer backbone, "
                          f"not {type(model).__name__}; use ssf, lora or adapter")
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def _adapter_wrap(m, model, cfg, arch) -> nn.Module:
    if arch == "vit":
        return Adapter(m, _plain(m.fc1).in_features, cfg.adapter_bottleneck, cfg.adapter_scale)
    return Adapter(m, _last_conv_channels(m), cfg.adapter_bottleneck, cfg.adapter_scale, mode="sequential")


def _vpt_wrap(m, model, cfg, arch) -> nn.Module:
    patch = getattr(model.patch_embed, "patch_size", (16, 16))
    val = math.sqrt(6.0 / float(3 * math.prod(patch) + model.embed_dim))  # VPT's init
    return DeepVPT(m, cfg.vpt_tokens, model.embed_dim, model.num_prefix_tokens, val)


register_pet(PETKind("lora", LoRA, order=0, foldable=True, targets=_lora_targets,
                     wrap=lambda m, model, cfg, arch: LoRA(m, cfg.lora_rank, cfg.lora_alpha, cfg.lora_init),
                     check=lambda cfg: _positive("lora_rank", cfg.lora_rank)))
register_pet(PETKind("ssf", SSF, order=1, foldable=True, targets=_ssf_targets,
                     wrap=lambda m, model, cfg, arch: SSF(m)))
register_pet(PETKind("adapter", Adapter, order=2, foldable=False, targets=_adapter_targets, wrap=_adapter_wrap,
                     check=lambda cfg: _positive("adapter_bottleneck", cfg.adapter_bottleneck)))
register_pet(PETKind("vpt", DeepVPT, order=3, foldable=False, targets=_vpt_targets, wrap=_vpt_wrap,
                     check=lambda cfg: _positive("vpt_tokens", cfg.vpt_tokens)))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _last_conv_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise EdgeclError(f"pet.kinds: 'adapter' cannot infer the channels of {type(block).__name__}")
    return convs[-1].out_channels


def inject_pet(model: nn.Module, cfg: PETConfig) -> list:
    """Wrap the model's modules in place with the PET kinds in ``cfg.kinds``.

    Returns the qualified (bare-model) names of the wrapped modules, unique, in injection
    order (lora, ssf, adapter, vpt: LoRA innermost, SSF around it). Stores a copy of
    ``cfg`` as ``model._edgecl_pet_cfg``. The order and the targets come from each kind's
    :class:`PETKind`. Auto targets: ViT: SSF on every Linear / Conv /
    LayerNorm outside the head, LoRA on ``attn.qkv``, adapters on ``blocks.i.mlp``, VPT on
    ``blocks.i``; EfficientNet/MobileNetV3: SSF on conv_stem/dw/pw/pwl/head, LoRA on the
    1x1 conv_pw/pwl/head, adapters after every block; other models: SSF on Linear/Conv,
    LoRA on Linear/1x1 Conv (the classifier is never wrapped).
    """
    unknown = [k for k in cfg.kinds if k not in PET_KINDS]
    if unknown:
        raise EdgeclError(f"pet.kinds: unknown kind(s) {unknown}; valid kinds: {', '.join(PET_KINDS)}")
    if any(isinstance(m, _pet_types()) for m in model.modules()):
        raise EdgeclError("inject_pet: the model already has PET modules (inject once, on the bare backbone)")
    kinds = sorted((PET_KINDS[k] for k in set(cfg.kinds)), key=lambda k: k.order)
    for kind in kinds:
        kind.check(cfg)
    arch = _arch(model)
    plan = []
    for kind in kinds:  # resolved on the bare model
        names = kind.targets(model, cfg, arch)
        if not names:
            hint = f"; set pet.{kind.name}_targets" if hasattr(cfg, f"{kind.name}_targets") else ""
            raise EdgeclError(f"pet.kinds: '{kind.name}' found no module to wrap in {type(model).__name__}{hint}")
        plan.append((kind, names))
    wrapped = []
    for kind, names in plan:
        for name in names:
            _replace(model, name, kind.wrap(model.get_submodule(name), model, cfg, arch))
            if name not in wrapped:
                wrapped.append(name)
    model._edgecl_pet_cfg = copy.deepcopy(cfg)
    return wrapped


# ----------------------------------------------------------------------------- training

def _trainable_named(model: nn.Module, cfg: PETConfig | None = None) -> list:
    cfg = cfg if cfg is not None else getattr(model, "_edgecl_pet_cfg", None) or PETConfig(kinds=[])
    head = _classifier_ids(model)
    pet_types = _pet_types()
    ids = set()
    token = getattr(model, "cls_token", None)
    if cfg.tune_cls_token and isinstance(token, nn.Parameter):  # ViT class token (SLCA++'s hybrid slow learner)
        ids.add(id(token))
    for _name, m in model.named_modules():
        if isinstance(m, pet_types):
            ids.update(id(p) for _, p in m.pet_named_parameters())
        elif id(m) in head:
            continue
        elif cfg.tune_norms and isinstance(m, _NORMS):
            ids.update(id(p) for p in (getattr(m, "weight", None), getattr(m, "bias", None))
                       if isinstance(p, nn.Parameter))
        if cfg.tune_biases and id(m) not in head and not isinstance(m, pet_types):
            b = m._parameters.get("bias")
            if b is not None:
                ids.add(id(b))
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def pet_parameters(model: nn.Module, cfg: PETConfig | None = None) -> list:
    """Trainable parameters: all PET parameters, plus norm affine parameters when
    ``cfg.tune_norms``, every backbone ``bias`` when ``cfg.tune_biases`` and a ViT's class token
    when ``cfg.tune_cls_token`` (the classifier from ``get_classifier()`` excluded). ``cfg``
    defaults to ``model._edgecl_pet_cfg``."""
    return [p for _, p in _trainable_named(model, cfg)]


def freeze_for_pet(model: nn.Module, cfg: PETConfig | None = None) -> None:
    """requires_grad=False everywhere except :func:`pet_parameters` (classifier included:
    learners re-enable their own head)."""
    keep = {id(p) for p in pet_parameters(model, cfg)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def set_pet_train_mode(model: nn.Module, training: bool = True) -> None:
    """``model.train(training)`` but every BatchNorm (incl. timm BatchNormAct2d) stays in
    eval mode, so running statistics never update. Dropout / drop-path follow ``training``
    as timm configured them. Call again after any later ``model.train()``."""
    model.train(training)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def pet_state_dict(model: nn.Module, cfg: PETConfig | None = None) -> dict:
    """Detached copies of the tensors :func:`pet_parameters` returns, keyed by their
    qualified names in the injected model."""
    return {n: p.detach().clone() for n, p in _trainable_named(model, cfg)}


def load_pet_state_dict(model: nn.Module, sd: dict, cfg: PETConfig | None = None) -> None:
    """Strictly load a :func:`pet_state_dict`; missing/unexpected keys or wrong shapes
    raise EdgeclError naming them."""
    own = dict(_trainable_named(model, cfg))
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))

    def few(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

    if missing or unexpected:
        parts = ([f"missing keys: {few(missing)}"] if missing else []) + \
                ([f"unexpected keys: {few(unexpected)}"] if unexpected else [])
        raise EdgeclError(f"PET state dict does not match the model's PET config; {'; '.join(parts)}")
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(p.shape)}" for k, p in own.items() if sd[k].shape != p.shape]
    if bad:
        raise EdgeclError(f"PET state dict shape mismatch: {few(bad)}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(sd[k])


# ----------------------------------------------------------------------------- folding

def fold_pet(model: nn.Module) -> nn.Module:
    """Replace every wrapper of a foldable kind (SSF, LoRA; nested ones included) by its plain
    module with folded weights, in place; the others (adapters, VPT) stay. Returns the model."""
    foldable = _foldable_types()

    def fold_children(module):
        for name, child in list(module.named_children()):
            fold_children(child)
            if isinstance(child, foldable):
                setattr(module, name, child.fold())

    fold_children(model)
    return model.fold() if isinstance(model, foldable) else model


def unfolded(model: nn.Module) -> list:
    """Names of the foldable wrappers left in ``model`` (none after :func:`fold_pet`)."""
    return [type(m).__name__ for m in model.modules() if isinstance(m, _foldable_types())]


def count_parameters(model: nn.Module) -> dict:
    """{"total": all parameters, "trainable": those with requires_grad} (shared counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}
