"""SLCA, SLCA++ and sequential fine-tuning (Zhang et al., "SLCA: Slow Learner with Classifier
Alignment for Continual Learning on a Pre-trained Model", ICCV 2023; "SLCA++: Unleash the Power
of Sequential Fine-tuning for Continual Learning with Pre-training", arXiv 2408.08295).

One learner, three configurations (``configs/{seqft,slca,slcapp}.yaml``):

- Stage 1, every session: the backbone (``pet.kinds: []``: every weight; else its PET, plus
  norms and biases for SLCA++'s *hybrid slow learner*, ``pet.tune_norms / tune_biases``) and a
  new linear head for the session's classes are trained together. The *slow learner* (SLCA
  Sec. 4.1): the backbone's lr is ``slca.backbone_lr_ratio`` (1/100) times the head's. The loss
  is cross-entropy over the session's own logits (``slca.ce_scope: session``, as the authors'
  code), or SLCA++'s symmetric cross-entropy (``slca.alpha`` CE + ``slca.beta`` RCE, SLCA++
  Sec. 4.2). Heads of earlier sessions stay frozen. BatchNorm statistics stay frozen.
- Class statistics: after stage 1, each new class's feature mean and covariance through the
  current model (:class:`edgecl.core.classstats.ClassStats`); an old class's statistics are not
  recomputed (its images are gone).
- Classifier alignment (SLCA Sec. 4.2), every session after the first: a copy of all heads is
  re-trained on features drawn from N(mu_c, Sigma_c) for every seen class, with logit
  normalisation l / (tau ||l||) (:func:`edgecl.losses.logit_normalize`). As in the authors'
  code, the aligned copy predicts, and the next session starts again from the stage-1 heads.
- ``--method seqft``: backbone_lr_ratio 1, no alignment (the papers' "Seq FT" baseline).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import pet as petlib
from ..core.alignment import AlignmentSpec, adjust_draws, head_scales, sessions_of
from ..core.classstats import ClassStats, ClassStatsError
from ..core.errors import EdgeclError
from ..core.formats import pack, unpack
from ..core.records import to_dict
from ..losses import logit_normalize, symmetric_cross_entropy
from .base import Learner


class SessionLinear(nn.Module):
    """SLCA's classifier: one linear layer (weight and bias) per session, logits concatenated
    in class order. Initialised as the authors' code (truncated normal, std 0.02; bias 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.heads = nn.ModuleList()

    @property
    def blocks(self) -> list:
        return [h.out_features for h in self.heads]

    @property
    def num_classes(self) -> int:
        return sum(self.blocks)

    def add_session(self, num_classes: int) -> nn.Linear:
        ref = next(self.parameters(), torch.empty(0))
        head = nn.Linear(self.dim, num_classes, device=ref.device)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        for p in self.parameters():  # heads of earlier sessions stay frozen
            p.requires_grad_(False)
        self.heads.append(head)
        return head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    def export(self) -> dict:
        """``weight`` [C, d], ``bias`` [C], ``blocks`` [sessions] (classes per session)."""
        return {"weight": torch.cat([h.weight.detach() for h in self.heads]).cpu(),
                "bias": torch.cat([h.bias.detach() for h in self.heads]).cpu(),
                "blocks": torch.tensor(self.blocks, dtype=torch.int64)}

    @classmethod
    def from_export(cls, tensors: dict) -> SessionLinear:
        weight, bias = tensors["weight"].float(), tensors["bias"].float()
        head = cls(weight.shape[1])
        start = 0
        for k in tensors["blocks"].tolist():
            layer = head.add_session(int(k))
            with torch.no_grad():
                layer.weight.copy_(weight[start:start + k])
                layer.bias.copy_(bias[start:start + k])
            start += k
        for p in head.parameters():
            p.requires_grad_(False)
        return head


class SLCA(Learner):
    name = "slca"

    def __init__(self, cfg, backbone, device=None):
        super().__init__(cfg, backbone, device)
        sc = cfg.slca
        if sc.backbone_lr_ratio < 0 or (sc.first_session_pet_lr_ratio or 0) < 0:
            raise EdgeclError("slca.backbone_lr_ratio and slca.first_session_pet_lr_ratio must be >= 0")
        if sc.ca_epochs < 0 or sc.ca_samples_per_class < 1 or sc.ca_batch_size < 1:
            raise EdgeclError("slca.ca_epochs must be >= 0, slca.ca_samples_per_class and slca.ca_batch_size >= 1")
        if sc.fc_scale_mu < 0:
            raise EdgeclError(f"slca.fc_scale_mu must be >= 0 (0: off), got {sc.fc_scale_mu}")
        self.uses_pet = bool(cfg.pet.kinds)
        if self.uses_pet:
            self.model = self.make_pet_model()
        else:  # sequential fine-tuning of every backbone weight
            self.model = copy.deepcopy(self.ptm).to(self.device)
            for p in self.model.parameters():
                p.requires_grad_(True)
        d = self.ptm.feature_dim
        self.head = SessionLinear(d).to(self.device)  # stage-1 heads (what the next session starts from)
        self.aligned = None  # the aligned copy that predicts (None: the stage-1 heads predict)
        self.stats = ClassStats(d, sc.cov_form, sc.cov_rank, sc.cov_eps)
        try:  # fail before training when the bundle's statistics could not be written
            self.stats.convert(sc.export_cov_form, sc.export_cov_rank)
        except ClassStatsError:
            raise EdgeclError(f"slca.export_cov_form {sc.export_cov_form} (rank {sc.export_cov_rank}) cannot be "
                              f"derived from slca.cov_form {sc.cov_form} (rank {sc.cov_rank}); set slca.cov_form: "
                              f"full or export the training form") from None
        self.volatile = {"model"}
        self.history: dict = {}

    # ------------------------------------------------------------------ stage 1
    def _param_groups(self, t: int, head: nn.Module) -> list:
        """Head at train.head_lr; backbone / PET at head_lr * backbone_lr_ratio (the slow learner);
        LoRA in session 1 at head_lr * first_session_pet_lr_ratio when that is set (SLCA++ code)."""
        tc, sc = self.cfg.train, self.cfg.slca
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        lora_ids = {id(p) for m in self.model.modules() if isinstance(m, petlib.LoRA)
                    for _, p in m.pet_named_parameters()}
        ratio_first = sc.first_session_pet_lr_ratio
        lora_ratio = ratio_first if (t == 0 and ratio_first is not None) else sc.backbone_lr_ratio
        groups = [{"params": list(head.parameters()), "lr": tc.head_lr}]
        for params, ratio in (([p for p in trainable if id(p) in lora_ids], lora_ratio),
                              ([p for p in trainable if id(p) not in lora_ids], sc.backbone_lr_ratio)):
            if params and ratio > 0:
                groups.append({"params": params, "lr": tc.head_lr * ratio})
        return groups

    def train_session(self, t: int, train, new_classes: list) -> None:
        """Stage 1: the slow learner and this session's head (SLCA Sec. 4.1, SLCA++ Sec. 4.2)."""
        tc, sc = self.cfg.train, self.cfg.slca
        new_head = self.head.heads[-1]
        first = new_classes[0]
        local = sc.ce_scope == "session"

        def step(x, y):
            logits = self.head(self.dist.join(self.model(x), len(y)))  # under torchrun: the whole batch
            if local:
                logits, y = logits[:, first:], y - first
            return symmetric_cross_entropy(logits, y, sc.alpha, sc.beta, sc.rce_log_zero)

        head_params = new_head if local else self.head
        if not local:
            for p in self.head.parameters():
                p.requires_grad_(True)
        groups = self._param_groups(t, head_params)
        self.history[f"session_{t + 1}"] = self.fit(groups, train, tc.epochs, step,
                                                    desc=f"session {t + 1}: {self.name}",
                                                    modules=(self.model.model,))
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.bump("model")

    # ------------------------------------------------------------------ classifier alignment
    def alignment_spec(self) -> AlignmentSpec:
        """The alignment's settings (also what the engine directory carries for the device)."""
        sc, tc = self.cfg.slca, self.cfg.train
        return AlignmentSpec(epochs=sc.ca_epochs, samples_per_class=sc.ca_samples_per_class,
                             batch_size=sc.ca_batch_size, lr=sc.ca_lr, momentum=tc.momentum,
                             weight_decay=tc.weight_decay, tau=sc.tau, logit_norm=sc.logit_norm,
                             mean_scale=sc.ca_mean_scale, fc_scale_mu=sc.fc_scale_mu, seed=self.cfg.seed)

    def align(self, stats: ClassStats, head: SessionLinear, session: int, draw: int = 0,
              spec: AlignmentSpec | None = None) -> SessionLinear:
        """Classifier alignment (SLCA Sec. 4.2; :mod:`edgecl.core.alignment`): a copy of ``head``
        re-trained on features drawn from N(mu_c, Sigma_c + eps I) of every seen class, fresh
        samples every epoch, with CE of the normalised logits l / (tau ||l||), SGD (momentum,
        weight decay) with a cosine lr over the epochs, as the authors' code; their heuristics
        (mean scaling, ``fc_scale_mu``) when configured, the head-input scales folded into the
        returned copy. Seeded by the run's seed, the session and ``draw`` (0 in training; others
        give independent repetitions). ``spec``: other settings than the config's (experiments)."""
        spec = spec or self.alignment_spec()
        aligned = copy.deepcopy(head).to(self.device)
        for p in aligned.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(aligned.parameters(), lr=spec.lr, momentum=spec.momentum,
                              weight_decay=spec.weight_decay)
        rng = np.random.default_rng(self.cfg.seed + 1009 * session + 7919 * draw)
        gen = torch.Generator().manual_seed(self.cfg.seed + 1013 * session + 7919 * draw)
        losses = []
        with torch.enable_grad():
            self._align_epochs(aligned, opt, stats, rng, gen, spec, losses)
        self.history[f"ca_{session + 1}"] = losses
        if spec.fc_scale_mu > 0:  # SLCA++'s head-input scales 1 + mu (T - t), folded (the head is linear)
            scales = head_scales(np.arange(len(aligned.blocks)), len(aligned.blocks) - 1, spec.fc_scale_mu)
            with torch.no_grad():
                for layer, scale in zip(aligned.heads, scales):
                    layer.weight.mul_(float(scale))
        for p in aligned.parameters():
            p.requires_grad_(False)
        return aligned.eval()

    def _align_epochs(self, aligned, opt, stats, rng, gen, spec, losses) -> None:
        blocks = aligned.blocks if spec.logit_norm == "session" else None
        sessions, last = sessions_of(aligned.blocks), len(aligned.blocks) - 1
        means = stats.mean.astype(np.float32)
        for epoch in range(spec.epochs):
            for g in opt.param_groups:
                g["lr"] = spec.lr_at(epoch)
            x, y = stats.sample(spec.samples_per_class, rng)
            x = adjust_draws(x, y, means, sessions, last, spec, rng)
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            order = torch.randperm(len(y), generator=gen)
            total = 0.0
            for start in range(0, len(y), spec.batch_size):
                idx = order[start:start + spec.batch_size]
                logits = aligned(x[idx].to(self.device))
                if spec.tau > 0:
                    logits = logit_normalize(logits, spec.tau, blocks)
                loss = F.cross_entropy(logits, y[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / max(1, len(y)))

    def learn(self, t, train, new_classes):
        self.head.add_session(len(new_classes))
        if self.cfg.train.epochs > 0:
            self.train_session(t, train, new_classes)
        part, _rows = self.my_part(train)  # under torchrun: this rank's part, the statistics merged
        feats = self.features(self.model, "model", part)
        if self.dist.active:
            local = ClassStats(self.stats.dim, self.stats.form, self.stats.rank, self.stats.eps)
            local.add(feats.numpy(), np.asarray(part.labels))
            for other in self.dist.gather(local):  # in rank order: every rank merges alike
                self.stats = self.stats.merge(other)
        else:
            self.stats.add(feats.numpy(), np.asarray(part.labels))
        sc = self.cfg.slca
        self.aligned = self.align(self.stats, self.head, t) if (t > 0 and sc.ca_epochs > 0) else None

    # ------------------------------------------------------------------ inference
    @property
    def classifier(self) -> SessionLinear:
        return self.aligned if self.aligned is not None else self.head

    @torch.no_grad()
    def predict(self, images, rows=None):
        f = self.features(self.model, "model", images, rows)
        return {"main": self.classifier(f.to(self.device)).cpu().numpy()}

    def feature_models(self):
        return {"main": self.model}

    # ------------------------------------------------------------------ bundle
    def export_stats(self) -> ClassStats:
        """The class statistics in the export form (``slca.export_cov_form`` / ``export_cov_rank``)."""
        sc = self.cfg.slca
        key = (id(self.stats), self.stats.count.sum(), self.stats.num_classes)
        if getattr(self, "_export_key", None) != key:
            self._export, self._export_key = self.stats.convert(sc.export_cov_form, sc.export_cov_rank), key
        return self._export

    def state(self):
        stats = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.export_stats().state().items()}
        out = {"heads": {**pack(self.classifier.export(), "linear"),
                         **pack(self.head.export(), "stage1")},  # the heads before alignment (training only)
               "stats": pack(stats, "classstats")}
        if self.uses_pet:
            out["pet"] = petlib.pet_state_dict(self.model.model)
        else:
            out["finetuned"] = {k: v.detach().clone() for k, v in self.model.model.state_dict().items()}
        return out

    def meta(self):
        sc = self.cfg.slca
        return {**super().meta(), "feature_dim": self.ptm.feature_dim, "head": "linear",
                "linear": {"logits": "f @ weight.T + bias", "blocks": self.head.blocks,
                           "aligned": self.aligned is not None},
                "alignment": to_dict(self.alignment_spec()),  # what the device re-runs to enroll
                "classstats": {"form": sc.export_cov_form, "rank": sc.export_cov_rank, "eps": sc.cov_eps,
                               "bytes_per_class": ClassStats(self.ptm.feature_dim, sc.export_cov_form,
                                                             sc.export_cov_rank).bytes_per_class()},
                "history": self.history}

    def load_state(self, tensors, meta):
        if self.uses_pet:
            petlib.load_pet_state_dict(self.model.model, tensors["pet"])
        else:
            if "finetuned" not in tensors:
                raise EdgeclError("bundle lacks finetuned.safetensors (the fine-tuned backbone); re-run edgecl train")
            self.model.model.load_state_dict(tensors["finetuned"])
        self.model.eval()
        self.bump("model")
        self.head = SessionLinear.from_export(unpack(tensors["heads"], "stage1")).to(self.device)
        self.aligned = (SessionLinear.from_export(unpack(tensors["heads"], "linear")).to(self.device)
                        if meta.get("linear", {}).get("aligned") else None)
        stats = {k: v.numpy() for k, v in unpack(tensors.get("stats", {}), "classstats").items()}
        if stats:
            self.stats = ClassStats.from_state(stats)
        self.num_seen = self.head.num_classes


class SeqFT(SLCA):
    """Sequential fine-tuning (the papers' Seq FT baseline): configs/seqft.yaml sets
    backbone_lr_ratio 1 and no classifier alignment."""

    name = "seqft"


class SLCAPlusPlus(SLCA):
    """SLCA++: configs/slcapp.yaml sets LoRA (the PET), the hybrid slow learner (norms and
    biases tuned too) and symmetric cross-entropy (alpha 0.5, beta 0.5)."""

    name = "slcapp"
