"""The learner interface and the one class-incremental session loop every method plugs into.

A learner sees each session's training images once (``learn``), with labels already mapped to
incremental class ids (0 .. seen-1 in the seeded class order), and predicts logits over all
classes seen so far (``predict``). Methods with several predictors (SAFE: slow, fast and their
aggregate) return one logits array per predictor; ``"main"`` is the method's answer.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import pet as petlib
from ..backbones import Backbone, Normalize
from ..config import Config
from ..data import ImageSet, Scenario, augment_batch, iterate_batches
from ..distributed import SINGLE
from ..metrics import SessionMetrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Learner:
    """Base class: holds the frozen pretrained backbone, feature extraction with a cache, and
    a generic PET training loop. Subclasses implement :meth:`learn` and :meth:`predict`."""

    name = "base"
    predictors: tuple = ("main",)

    def __init__(self, cfg: Config, backbone: Backbone, device: Optional[torch.device] = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.train.device)
        # channels-last memory for speed (python -m benchmarks channels_last; a SAFE quick run went from
        # 987 to 891 s); the weights' values, and so bundles and exports, are unchanged
        self.ptm = backbone.to(self.device, memory_format=torch.channels_last).eval()
        for p in self.ptm.parameters():
            p.requires_grad_(False)
        self.normalize = Normalize(backbone.mean, backbone.std).to(self.device)
        self.num_seen = 0
        self.progress = True  # progress bars (run_sessions sets it)
        self.dist = SINGLE  # the run's processes (edgecl.distributed; train sets it under torchrun)
        self._compiled: set = set()  # ids of the models compiled in place (train.compile)
        self._versions: dict = {}
        self.volatile: set = set()  # tags of models that change every session: no full-set caching
        self._cache: dict = {}

    # ------------------------------------------------------------------ to override
    def learn(self, t: int, train: ImageSet, new_classes: list) -> None:
        raise NotImplementedError

    def predict(self, images: ImageSet, rows: Optional[np.ndarray] = None) -> dict:
        """Logits (numpy, [len(rows) or N, num_seen]) per predictor name; ``"main"`` is required."""
        raise NotImplementedError

    def state(self) -> dict:
        """Tensors for the bundle, by file stem: ``{"pet": {...}, "heads": {...}, "stats": {...}}``."""
        raise NotImplementedError

    def meta(self) -> dict:
        """JSON-serialisable facts the exporter and the device need (feature sizes, lambda...)."""
        return {"num_seen": self.num_seen}

    def load_state(self, tensors: dict, meta: dict) -> None:
        raise NotImplementedError

    def figures(self, labels: np.ndarray, logits: dict, session_of_label: np.ndarray) -> dict:
        """Method-specific PNGs for the bundle ({file name: bytes}) from the final evaluation."""
        return {}

    def session_facts(self, logits: dict, labels: np.ndarray, session_of_label: np.ndarray) -> dict:
        """Method facts recorded after each session's test (metrics.json ``per_session``; SAFE:
        the learners' mean aggregation weights), from the gathered logits of the test images,
        their labels and each label's session."""
        return {}

    def feature_models(self) -> dict:
        """The feature extractors the heads read, by predictor name (what the exporter puts
        in the graph): ``{"main": model}``; SAFE: ``{"slow": ..., "fast": ...}``. Each takes
        normalised float NCHW and returns [B, feature_dim]."""
        return {"main": self.ptm}

    # ------------------------------------------------------------------ helpers
    def make_pet_model(self) -> Backbone:
        """A copy of the backbone with the configured PET injected, ready to train."""
        model = copy.deepcopy(self.ptm)
        petlib.inject_pet(model.model, self.cfg.pet)
        petlib.freeze_for_pet(model.model)
        return model.to(self.device, memory_format=torch.channels_last)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC frames on the device -> normalised float NCHW in channels-last memory."""
        return self.normalize(x).contiguous(memory_format=torch.channels_last)

    def bump(self, tag: str) -> None:
        """Mark the model called ``tag`` as changed: its cached features are stale."""
        self._versions[tag] = self._versions.get(tag, 0) + 1
        self._cache = {k: v for k, v in self._cache.items() if k[0] != tag}

    def features(self, model: torch.nn.Module, tag: str, images: ImageSet,
                 rows: Optional[np.ndarray] = None) -> torch.Tensor:
        """Features of the images (or of ``images[rows]``), eval mode, no augmentation.

        Features of the whole set are cached per model version; for a model in
        ``self.volatile`` (it changes every session) only the requested rows are computed.
        """
        key = (tag, self._versions.get(tag, 0), images.key)
        if key not in self._cache:
            if rows is not None and tag in self.volatile:
                return self._extract(model, images.subset(rows))
            self._cache[key] = self._extract(model, images)
        return self._cache[key] if rows is None else self._cache[key][torch.as_tensor(rows)]

    def my_part(self, images: ImageSet) -> tuple:
        """``(this rank's part of images, its row indices)``: a statistics pass over a session's
        images runs on every rank's part and sums (edgecl.distributed; one process: all of it)."""
        rows = self.dist.part(len(images))
        return (images if len(rows) == len(images) else images.subset(rows)), rows

    def class_means(self, feats: torch.Tensor, labels: torch.Tensor, classes: list) -> torch.Tensor:
        """Mean feature of each of ``classes`` over every rank's part (sums and counts summed)."""
        if not self.dist.active:
            return torch.stack([feats[labels == c].mean(0) for c in classes])
        sums = torch.stack([feats[labels == c].double().sum(0) for c in classes])
        counts = torch.tensor([float((labels == c).sum()) for c in classes], dtype=torch.float64)
        self.dist.sum(sums, counts)
        return (sums / counts.clamp(min=1)[:, None]).float()

    @torch.no_grad()
    def _extract(self, model: torch.nn.Module, images: ImageSet) -> torch.Tensor:
        was_training = model.training
        model.eval()
        bs = self.cfg.train.eval_batch_size
        out = []
        for start in range(0, len(images), bs):
            x = torch.from_numpy(np.ascontiguousarray(images.images[start:start + bs])).to(self.device)
            out.append(model(self.prepare(x)).float().cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, getattr(model, "feature_dim", 0))

    def fit(self, params: list, train: ImageSet, epochs: int, step: Callable, desc: str,
            modules: tuple = ()) -> list:
        """Generic training loop: SGD/AdamW with cosine decay over ``epochs``.

        ``params`` are optimizer param groups (each with its ``lr``); ``step(x, y)`` takes a
        normalised augmented batch and its labels and returns a dict of named loss terms whose
        sum is minimised. Under torchrun ``x`` is this rank's part of the batch and ``y`` the whole
        batch's labels: the step passes its features through ``self.dist.join(f, len(y))``.
        ``modules`` are put in PET train mode (BatchNorm stays frozen).
        Returns the mean of each loss term per epoch.
        """
        tc = self.cfg.train
        if tc.optimizer == "sgd":
            opt = torch.optim.SGD(params, momentum=tc.momentum, weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.AdamW(params, weight_decay=tc.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(train) / tc.batch_size))
        total = max(1, epochs * steps_per_epoch)
        warm = tc.warmup_epochs * steps_per_epoch
        base_lrs = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919 * self.num_seen)
        labels = torch.from_numpy(np.asarray(train.labels)).long()
        history = []
        for m in modules:
            petlib.set_pet_train_mode(m, True)
        if tc.compile:  # torch.compile, in place (the PET state-dict names stay); once per model
            for m in modules:
                if id(m) not in self._compiled:
                    m.compile()
                    self._compiled.add(id(m))
        run_step = self.dist.step(params, step, self.device)
        cuda = self.device.type == "cuda"
        bf16 = tc.precision == "bf16"  # autocast of the training steps only: statistics are taken in float32
        step_i = 0
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not self.progress)
        for _epoch in range(epochs):
            sums: dict = {}
            count = 0
            for idx in iterate_batches(len(train), tc.batch_size, shuffle=True, generator=gen):
                idx = np.sort(np.asarray(idx))
                # the global batch is drawn and its crops sampled identically on every rank; each rank
                # augments and runs the backbone on its part, and the step joins the features (Dist.join)
                part = self.dist.batch_part(len(idx)) if self.dist.active else None
                x = torch.from_numpy(np.ascontiguousarray(train.images[idx if part is None else idx[part]]))
                if cuda:  # pinned memory, an asynchronous copy, the augmentation on the GPU
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
                x = augment_batch(x, crop_scale=tuple(tc.crop_scale), hflip=tc.hflip, generator=gen,
                                  batch_size=len(idx), rows=part)
                x = self.prepare(x)
                y = labels[idx].to(self.device, non_blocking=True)
                scale = ((step_i + 1) / warm if step_i < warm
                         else 0.5 * (1 + math.cos(math.pi * (step_i - warm) / max(1, total - warm))))
                for g, lr in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr * scale
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    terms = run_step(x, y)
                loss = sum(terms.values())
                opt.zero_grad(set_to_none=True)
                self.dist.backward(loss)
                opt.step()
                for k, v in terms.items():  # summed on the device: no synchronisation per step
                    sums[k] = sums.get(k, 0.0) + v.detach().double() * len(idx)
                count += len(idx)
                step_i += 1
                bar.update(1)
                if bar.n % 10 == 1 and not bar.disable:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            sums = {k: float(v) for k, v in sums.items()}
            history.append({k: v / max(1, count) for k, v in sums.items()})
        bar.close()
        for m in modules:
            petlib.set_pet_train_mode(m, False)
        return history


def cross_entropy_step(model: torch.nn.Module, head: torch.nn.Module, dist=SINGLE) -> Callable:
    """The plain supervised step: CE of head(model(x)) against y (x this rank's part of the batch)."""

    def step(x, y):
        return {"ce": F.cross_entropy(head(dist.join(model(x), len(y))), y)}

    return step


def torch_labels(images: ImageSet) -> torch.Tensor:
    return torch.as_tensor(images.labels, dtype=torch.long)


def with_labels(images: ImageSet, labels: np.ndarray) -> ImageSet:
    return dataclasses.replace(images, labels=np.asarray(labels, dtype=np.int64))


def to_incremental(images: ImageSet, label_map: np.ndarray, classes=None) -> ImageSet:
    """The images of ``classes`` (dataset labels; all classes in the scenario when None),
    relabelled to incremental ids through ``label_map`` (:meth:`Scenario.label_map`)."""
    inc = label_map[images.labels]
    rows = np.where(inc >= 0 if classes is None else np.isin(images.labels, classes))[0]
    return with_labels(images.subset(rows), inc[rows])


def evaluate_parts(learner: Learner, images: ImageSet, rows: np.ndarray) -> dict:
    """``learner.predict(images, rows)``, each rank predicting its contiguous part of ``rows`` and
    the logits gathered back in order (edgecl.distributed; one process: predict)."""
    dist = learner.dist
    if not dist.active:
        return learner.predict(images, rows)
    parts = dist.gather(learner.predict(images, rows[dist.part(len(rows))]))
    return {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in parts[0]}


def run_sessions(learner: Learner, train: ImageSet, val: ImageSet, scenario: Scenario,
                 on_session: Optional[Callable] = None, progress: bool = True) -> dict:
    """Run every session of ``scenario``: learn, then evaluate on all classes seen so far.

    Returns ``{predictor: SessionMetrics}``. ``on_session(t, {predictor: accuracy})`` is
    called after each session (for printing). ``learner.timing`` holds the seconds spent
    learning (``learn_s``: training and head updates) and evaluating after each session
    (``eval_s``: the protocol's per-session test, which a deployment does not run).
    """
    n_dataset = len(train.class_names)
    label_map = scenario.label_map(n_dataset)
    session_of_label = np.concatenate([np.full(len(c), j) for j, c in enumerate(scenario.sessions)])
    val_all = to_incremental(val, label_map)
    metrics = {name: SessionMetrics() for name in learner.predictors}
    learner.progress = progress
    seen = 0
    learner.timing = {"learn_s": 0.0, "eval_s": 0.0}
    learner.session_log = []
    bar = tqdm(total=len(scenario.sessions), desc=f"{learner.name}", disable=not progress, dynamic_ncols=True)
    for t, classes in enumerate(scenario.sessions):
        session_train = to_incremental(train, label_map, classes)
        new = list(range(seen, seen + len(classes)))
        start = time.perf_counter()
        learner.learn(t, session_train, new)
        seen += len(classes)
        learner.num_seen = seen
        learner.timing["learn_s"] += time.perf_counter() - start
        start = time.perf_counter()
        rows = np.where(val_all.labels < seen)[0]
        logits = evaluate_parts(learner, val_all, rows)
        learner.timing["eval_s"] += time.perf_counter() - start
        accs = {}
        for name, lg in logits.items():
            pred = np.asarray(lg)[:, :seen].argmax(1)
            accs[name] = metrics[name].record(pred, val_all.labels[rows], session_of_label)
        facts = learner.session_facts(logits, val_all.labels[rows], session_of_label)
        if facts:
            learner.session_log.append({"session": t + 1, **facts})
        bar.update(1)
        bar.set_postfix(acc=f"{accs['main']:.2f}")
        if on_session:
            on_session(t, accs)
    bar.close()
    learner.final_eval = {"labels": val_all.labels[rows], "logits": logits, "session_of_label": session_of_label}
    return metrics
