"""Configuration: typed dataclasses, YAML files under ``configs/``, and their resolution.

Resolution order (later wins)::

    dataclass defaults
      <- configs/<method>.yaml             (its top-level keys)
      <- configs/<profile>.yaml            (quick | full | demo)
      <- configs/<method>.yaml: profiles.<profile>
      <- --config FILE
      <- CLI options and --set key=value

Every key is checked against the dataclasses below: an unknown key or a value of the wrong
type raises :class:`~edgecl.core.errors.EdgeclError` naming the key and the file it came from.
This module must not import torch (``edgecl --help`` stays light).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from .core.errors import EdgeclError
from .data import DATASETS
from .learners import REGISTRY as LEARNERS

PROFILES = ("quick", "full", "demo")  # demo: used by `edgecl demo`


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class DataConfig:
    """Where the images come from and how the class-incremental sessions are cut."""

    dataset: str = field(default="imagefolder", metadata=_choices(*DATASETS))
    root: Optional[str] = None  # --data: ImageFolder root (with train/ and val/) or download dir
    val_root: Optional[str] = None  # --val-data: separate ImageFolder for evaluation
    split: str = "B0Inc10"  # B{base}Inc{K}: base-session classes, then K new classes per session
    num_classes: Optional[int] = None  # use the first N classes of the seeded order (None: all)
    train_per_class: Optional[int] = None  # first N train images per class, sorted by file name
    val_per_class: Optional[int] = None  # first N val images per class (None: all)
    input_size: int = 224  # model input (square); images are decoded once at this size
    cache_dir: Optional[str] = None  # uint8 decode cache (None: $EDGECL_CACHE or ~/.cache/edgecl)
    workers: int = 2  # decode processes for the first pass over a folder


@dataclass
class BackboneConfig:
    """The pretrained model (a timm name) and where its weights come from."""

    name: str = "tf_efficientnet_lite0"
    # default: embedded weights where the backbone has them (EfficientNet-Lite0), else an error;
    # pretrained: timm hub download; random: random init (tests); anything else: a file path
    weights: str = "default"
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class PETConfig:
    """Parameter-efficient tuning modules injected into the frozen backbone."""

    kinds: list = field(default_factory=lambda: ["ssf"])  # any of ssf, adapter, lora, vpt; [] = none
    ssf_targets: list = field(default_factory=list)  # module-name regexes; [] = automatic per architecture
    lora_rank: int = 4
    lora_alpha: float = 4.0  # LoRA scale = alpha / rank
    # LoRA's A at init: Kaiming (the LoRA paper) or the top-r right singular vectors of W (SLCA++ code)
    lora_init: str = field(default="kaiming", metadata=_choices("kaiming", "svd"))
    lora_targets: list = field(default_factory=list)  # module-name regexes; [] = ViT qkv / CNN 1x1 convs
    adapter_bottleneck: int = 16
    adapter_scale: float = 0.1
    vpt_tokens: int = 5  # deep VPT prompts per block (ViT only)
    tune_norms: bool = False  # also train norm-layer affine parameters (running statistics stay frozen)
    tune_biases: bool = False  # also train the backbone's biases (SLCA++ hybrid slow learner)
    tune_cls_token: bool = False  # also train a ViT's class token (SLCA++ hybrid slow learner; no effect on CNNs)


@dataclass
class TrainConfig:
    """Optimisation of PET / heads by backpropagation."""

    epochs: int = 5  # epochs of PET adaptation (first session for RanPAC)
    batch_size: int = 48
    lr: float = 0.01  # PET learning rate
    head_lr: float = 0.01  # learning rate of the training-time (cosine) head
    weight_decay: float = 0.0005
    optimizer: str = field(default="sgd", metadata=_choices("sgd", "adamw"))
    momentum: float = 0.9
    warmup_epochs: int = 0
    crop_scale: list = field(default_factory=lambda: [0.5, 1.0])  # random-resized-crop area range
    hflip: bool = True
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16"))  # bf16: autocast of training steps
    compile: bool = False  # torch.compile the models being trained (a GPU option: minutes of compiling first)


@dataclass
class RanPACConfig:
    """RanPAC head: h = ReLU(W_rand^T f), G = sum h h^T, Q = sum h y^T, W = (G + lambda I)^-1 Q."""

    M: int = 10000  # random projection size (0: ridge regression on the raw features)
    lambdas: list = field(default_factory=lambda: [10.0**e for e in range(-8, 15)])  # candidates
    holdout_fraction: float = 0.2  # share of each class's training images held out to choose lambda


@dataclass
class SAFEConfig:
    """SAFE (Zhao et al., NeurIPS 2024): slow learner with the transfer loss, fast learner with
    cross-classification and feature alignment, entropy-based aggregation."""

    lambda_diag: float = 1.0  # transfer loss: weight of L_diag (PTM/slow correlation diagonal -> 1)
    lambda_rdn: float = 1.0  # transfer loss: weight of L_rdn (off-diagonal -> 0)
    transfer_norm: str = field(default="batch", metadata=_choices("batch", "sample"))  # paper: batch
    # transfer terms averaged over the d (d(d-1)) entries, or summed as in the authors' code
    transfer_reduction: str = field(default="mean", metadata=_choices("mean", "sum"))
    lambda_cc: float = 1.0  # weight of the cross-classification loss (fast learner)
    lambda_cos: float = 50.0  # weight of the feature-alignment loss 1 - cos(fast, slow), mean over the batch
    fast_epochs: int = 3  # fast-learner epochs in every session after the first
    fast_lr: float = 0.01  # fast PET learning rate
    gamma: float = 1.0  # aggregation sharpness: weights = softmax(-gamma [H_slow, H_fast])
    # each learner's logits divided by a temperature before the entropy (and the mix): "fit" = by
    # NLL on the RanPAC heads' held-out training rows, out of sample (issue 16); "none" = T = 1
    # (the paper); "sigma" = 1 / the learner's cosine-head scale (the authors' code multiplies its
    # RanPAC logits by sigma); chosen on held-out training images: python -m experiments.safe_select --aggregation
    temperature: str = field(default="none", metadata=_choices("fit", "none", "sigma"))
    # after every fast session, correct the old classes' rows of G_f, Q_f for the fast learner's
    # drift, from per-class Gaussians of fast features (edgecl.learners.drift); off: it lost on
    # the held-out training images (python -m experiments.safe_select --aggregation)
    refresh_fast: bool = False
    refresh_rank: int = 16  # rank of each class's Gaussian (plus an isotropic residual)
    refresh_draws: int = 64  # draws per old class and refresh
    keep_stale: bool = False  # diagnostics: also keep the never-refreshed fast head (ablation rows)
    inference: str = field(default="aggregate", metadata=_choices("aggregate", "slow", "fast"))  # what "main" is


@dataclass
class SLCAConfig:
    """SLCA (Zhang et al., ICCV 2023) and SLCA++ (arXiv 2408.08295); sequential fine-tuning
    (``--method seqft``) is the same learner with backbone_lr_ratio 1 and no alignment."""

    backbone_lr_ratio: float = 0.01  # slow learner: backbone (or PET) lr = train.head_lr * this (SLCA: 1/100)
    # PET (LoRA) lr ratio in session 1 (SLCA++ code: 0.5); None: backbone_lr_ratio
    first_session_pet_lr_ratio: Optional[float] = None
    # stage-1 loss over this session's classes (code) or all seen
    ce_scope: str = field(default="session", metadata=_choices("session", "seen"))
    alpha: float = 1.0  # weight of cross-entropy (SLCA++ symmetric CE: 0.5)
    beta: float = 0.0  # weight of reverse cross-entropy (SLCA++: 0.5; 0 = plain CE)
    rce_log_zero: float = -4.0  # log 0 in reverse CE (SCE paper's A; the SLCA++ code clamps at log 1e-4)
    ca_epochs: int = 5  # classifier-alignment epochs after every session but the first (0: no alignment)
    ca_samples_per_class: int = 256  # features drawn from N(mu_c, Sigma_c) per class and CA epoch
    ca_batch_size: int = 256
    ca_lr: float = 0.01  # SGD lr of the alignment (cosine decay over ca_epochs)
    tau: float = 0.1  # logit-normalisation temperature; 0 disables logit normalisation
    # ||l||: mean of per-session norms (code) or global (paper)
    logit_norm: str = field(default="session", metadata=_choices("session", "global"))
    # class covariance used by the alignment
    cov_form: str = field(default="full", metadata=_choices("full", "diag", "lowrank", "shared"))
    cov_rank: int = 16  # rank r of the lowrank form
    cov_eps: float = 0.0001  # ridge added to every covariance when sampling (authors' code: 1e-4)
    # statistics written to the bundle
    export_cov_form: str = field(default="lowrank", metadata=_choices("full", "diag", "lowrank", "shared"))
    export_cov_rank: int = 64  # rank of the exported lowrank form (within 0.5 point of full on the quick protocol)
    # alignment heuristics of the authors' code (docs/METHODS.md): SLCA's scaling of an old class's
    # sampled mean by 0.9 + 0.1 (t_c + 1) / (T + 1), and SLCA++'s feature scaling of old sessions
    # (draws of session t shrunk by 1 / (1 + mu (T - t)), its head's input scaled by 1 + mu (T - t))
    ca_mean_scale: bool = False
    fc_scale_mu: float = 0.0  # 0: off (SLCA++ code: 0.02)


@dataclass
class Config:
    """The whole resolved configuration of one run; saved as ``config.yaml`` in the bundle."""

    method: str = field(default="ranpac", metadata={"choices": LEARNERS})  # the learner registry
    profile: Optional[str] = field(default=None, metadata=_choices(*PROFILES))
    seed: int = 1993
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pet: PETConfig = field(default_factory=PETConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ranpac: RanPACConfig = field(default_factory=RanPACConfig)
    safe: SAFEConfig = field(default_factory=SAFEConfig)
    slca: SLCAConfig = field(default_factory=SLCAConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _check_value(key: str, value: Any, tp: Any, meta: dict, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_value(key, value, args[0], meta, source)
    bad = f"config key '{key}' (from {source}) must be"
    if tp is bool:
        if not isinstance(value, bool):
            raise EdgeclError(f"{bad} true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise EdgeclError(f"{bad} an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EdgeclError(f"{bad} a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise EdgeclError(f"{bad} a string, got {value!r}")
    elif tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise EdgeclError(f"{bad} a list, got {value!r}")
    elif tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise EdgeclError(f"{bad} a mapping, got {value!r}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise EdgeclError(f"{bad} one of {', '.join(choices)}; got {value!r}")
    return value


def _merge_into(obj: Any, updates: dict, source: str, prefix: str = "") -> None:
    """Apply a nested mapping of overrides to a dataclass instance, validating every key."""
    if not isinstance(updates, dict):
        raise EdgeclError(f"config section '{prefix or '<top>'}' (from {source}) must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise EdgeclError(f"unknown config key '{key}' (from {source}); known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, source, prefix=f"{key}.")
        else:
            setattr(obj, name, _check_value(key, value, hints[name], dict(fields[name].metadata), source))


def _read_yaml(path: Path, source: str) -> dict:
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgeclError(f"cannot read config file {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EdgeclError(f"config file {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EdgeclError(f"config file {source} must hold a mapping at the top level")
    return data


def packaged_config(name: str) -> dict:
    """Read ``configs/<name>.yaml`` shipped with the package ({} when there is none)."""
    ref = resources.files("edgecl.configs").joinpath(f"{name}.yaml")
    if not ref.is_file():
        return {}
    with resources.as_file(ref) as path:
        return _read_yaml(Path(path), f"configs/{name}.yaml")


def parse_set(items: typing.Iterable[str]) -> dict:
    """Turn ``--set a.b=value`` items into a nested mapping (values parsed as YAML scalars)."""
    import yaml

    out: dict = {}
    for item in items:
        if "=" not in item:
            raise EdgeclError(f"--set expects KEY=VALUE (for example train.epochs=3), got {item!r}")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def resolve_config(
    method: str,
    profile: Optional[str] = None,
    config_file: Optional[str] = None,
    overrides: Optional[dict] = None,
) -> Config:
    """Build the run's :class:`Config` (see the module docstring for the order)."""
    if method not in LEARNERS:
        raise EdgeclError(f"unknown method {method!r}; choose one of: {', '.join(LEARNERS)}")
    if profile is not None and profile not in PROFILES:
        raise EdgeclError(f"unknown profile {profile!r} (--profile); choose one of: {', '.join(PROFILES)}")
    cfg = Config(method=method, profile=profile)
    method_cfg = copy.deepcopy(packaged_config(method))
    per_profile = method_cfg.pop("profiles", {}) or {}
    _merge_into(cfg, method_cfg, f"configs/{method}.yaml")
    if profile:
        _merge_into(cfg, packaged_config(profile), f"configs/{profile}.yaml")
    if profile and profile in per_profile:
        _merge_into(cfg, per_profile[profile], f"configs/{method}.yaml (profiles.{profile})")
    if config_file:
        user = _read_yaml(Path(config_file), config_file)
        user.pop("profiles", None)
        _merge_into(cfg, user, config_file)
    if overrides:
        _merge_into(cfg, overrides, "command-line options")
    if cfg.method != method:
        raise EdgeclError(f"config sets method {cfg.method!r} but --method is {method!r}; drop one of them")
    return cfg


def config_from_dict(data: dict, source: str) -> Config:
    """Rebuild a :class:`Config` saved by :meth:`Config.to_dict` (for example from a bundle)."""
    cfg = Config()
    _merge_into(cfg, data, source)
    return cfg
