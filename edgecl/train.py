"""``edgecl train`` and ``edgecl eval`` for bundles: data -> sessions -> metrics -> bundle."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import yaml

from . import __version__, distributed
from .backbones import create_backbone
from .bundle import check_bundle_out, read_bundle, write_bundle
from .config import Config, config_from_dict
from .core.errors import EdgeclError
from .core.formats import BackboneInfo, BundleManifest, ClassList, InputSpec, LearnerFacts
from .core.records import from_dict, to_dict
from .data import build_scenario, cache_lock, load_dataset, load_imagefolder
from .learners import learner_class
from .learners.base import run_sessions, with_labels
from .metrics import plot_accuracy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_learner(cfg: Config, backbone=None):
    if backbone is None:
        backbone = create_backbone(cfg.backbone.name, cfg.backbone.weights, **cfg.backbone.kwargs)
    return learner_class(cfg.method)(cfg, backbone)


def train(cfg: Config, out: str, progress: bool = True, force: bool = False, log: Callable = print) -> dict:
    """Train ``cfg.method`` over the class-incremental sessions and write the bundle to ``out``
    (``force``: replace a bundle of another method there). Under ``torchrun`` every rank runs
    this; rank 0 alone logs and writes the bundle (:mod:`edgecl.distributed`).

    Returns the metrics dict that is also written to ``out/metrics.json``.
    """
    cls = learner_class(cfg.method)  # fail fast on an unbuilt method, before loading data
    check_bundle_out(out, cfg.method, force)  # and on an --out that must not be replaced
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    main = distributed.is_main_process()
    # under torchrun the processes take the data one after the other (the cache's lock): the first
    # decodes into the cache, the others read it; all before the process group starts its threads
    with cache_lock(cfg.data.cache_dir, enabled=distributed.requested()):
        data = load_dataset(cfg.data, progress=progress and main)
    dist = distributed.from_env(cfg.train.device)
    dist.stop_on_sigterm()
    try:
        return _train(cfg, out, cls, dist, data, progress and dist.main, log if dist.main else (lambda m: None))
    finally:
        dist.close()


def _train(cfg: Config, out: str, cls, dist, data: tuple, progress: bool, log: Callable) -> dict:
    train_set, val_set = data
    scenario = build_scenario(len(train_set.class_names), cfg.data.split, cfg.seed, cfg.data.num_classes)
    backbone = create_backbone(cfg.backbone.name, cfg.backbone.weights, **cfg.backbone.kwargs)
    learner = cls(cfg, backbone, device=dist.torch_device)  # under NCCL: this rank's GPU
    learner.dist = dist
    if dist.active:
        log(f"torchrun: {dist.world} processes ({dist.backend}); each trains on its part of every batch and "
            f"passes its part of the images, the statistics summed")
    log(f"edgecl train: {cfg.method} on {cfg.backbone.name} ({learner.device}), "
        f"{len(scenario.sessions)} sessions, {len(train_set)} train / {len(val_set)} val images "
        f"at {cfg.data.input_size}px")

    def report(t, accs):
        extra = "".join(f"  {k} {v:.2f}" for k, v in accs.items() if k != "main")
        log(f"session {t + 1}/{len(scenario.sessions)}: {sum(len(s) for s in scenario.sessions[: t + 1])} classes, "
            f"accuracy {accs['main']:.2f}{extra}")

    start = time.perf_counter()
    tracked = run_sessions(learner, train_set, val_set, scenario, on_session=report, progress=progress)
    elapsed = time.perf_counter() - start
    metrics = {"method": cfg.method, **tracked["main"].summary(), "time_s": round(elapsed, 1),
               **{k: round(v, 3) for k, v in learner.timing.items()}}
    for name, m in tracked.items():
        if name != "main":
            metrics[name] = m.summary()
    if learner.session_log:
        metrics["per_session"] = learner.session_log

    names = train_set.class_names
    manifest = BundleManifest(
        edgecl_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        method=cfg.method,
        backbone=BackboneInfo(name=cfg.backbone.name, kwargs=cfg.backbone.kwargs, weights=cfg.backbone.weights,
                              weights_sha256=backbone.weights_sha256(), feature_dim=backbone.feature_dim),
        input=InputSpec(size=cfg.data.input_size, channel_order="RGB", mean=list(backbone.mean),
                        std=list(backbone.std)),
        classes=ClassList(names=[names[c] for c in scenario.class_order],
                          sessions=[[names[c] for c in s] for s in scenario.sessions]),
        pet=cfg.to_dict()["pet"] if getattr(learner, "uses_pet", False) else None,
        learner=from_dict(LearnerFacts, learner.meta(), f"{cfg.method} learner facts"),
        config=cfg.to_dict(),
        metrics={k: metrics[k] for k in ("A_last", "A_avg", "forgetting")},
    )
    tensors = {"backbone": backbone.state_dict(), **learner.state()}
    curves = {cfg.method: tracked["main"].accuracy}
    curves.update({k: m.accuracy for k, m in tracked.items() if k != "main" and m.accuracy != tracked["main"].accuracy})
    png = plot_accuracy(curves, title=f"{cfg.method} on {cfg.backbone.name}",
                  classes_per_session=[len(s) for s in scenario.sessions])
    extra = {
        "metrics.json": json.dumps(metrics, indent=2),
        "config.yaml": yaml.safe_dump(cfg.to_dict(), sort_keys=False),
        "accuracy.png": png,
        **learner.figures(**learner.final_eval),
    }
    if dist.main:
        write_bundle(Path(out), manifest, tensors, extra)
    dist.barrier()  # the bundle is written (or rank 0 failed: then every rank stops here)
    return metrics


def load_learner(path: str):
    """Rebuild the trained learner from a bundle alone: (learner, manifest)."""
    manifest, tensors = read_bundle(Path(path))
    cfg = config_from_dict(manifest.config, f"{path}/manifest.json")
    bb = manifest.backbone
    backbone = create_backbone(bb.name, "random", **bb.kwargs)
    backbone.load_state_dict(tensors["backbone"])
    backbone.mean, backbone.std = tuple(manifest.input.mean), tuple(manifest.input.std)
    if backbone.weights_sha256() != bb.weights_sha256:
        raise EdgeclError(f"bundle {path}: backbone weights do not match the manifest's hash; the bundle is damaged")
    learner = build_learner(cfg, backbone)
    learner.load_state(tensors, to_dict(manifest.learner))
    return learner, manifest


def evaluate(path: str, data: str, split: str = "val", per_class: Optional[int] = None,
             progress: bool = True) -> dict:
    """Top-1 of a bundle on an ImageFolder (``data/split`` if that exists, else ``data``)."""
    learner, manifest = load_learner(path)
    root = Path(data)
    folder = root / split if (root / split).is_dir() else root
    if per_class is None:
        per_class = manifest.data_config.get("val_per_class")
    # the decode cache the user set ($EDGECL_CACHE), never a path read from the bundle
    images = load_imagefolder(folder, size=manifest.input.size, per_class=per_class, progress=progress)
    known = manifest.classes.names
    rows, labels = images.relabel(known)
    if len(rows) == 0:
        raise EdgeclError(f"none of the class folders in {folder} is a class of bundle {path} "
                          f"(it knows {len(known)} classes, e.g. {', '.join(known[:3])})")
    subset = with_labels(images.subset(rows), labels)
    logits = learner.predict(subset)
    out = {}
    for name, lg in logits.items():
        out[name] = round(100.0 * float((np.asarray(lg).argmax(1) == subset.labels).mean()), 4)
    skipped = sorted(set(images.class_names) - set(known))
    result = {"accuracy": out.pop("main"), "n": int(len(rows)), "classes": int(len(set(subset.labels.tolist()))),
              "skipped_classes": skipped, "path": str(path), "data": str(folder)}
    result.update({f"accuracy_{k}": v for k, v in out.items()})
    return result
