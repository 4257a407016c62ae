"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual
Learning", NeurIPS 2023).

Phase 1 (first session only): PET adaptation of the frozen backbone with a cosine head and
cross-entropy; the PET weights are then frozen for good. Phase 2 (every session): features go
through a fixed random projection with ReLU, the sufficient statistics G and Q are updated with
the session's data, and the ridge classifier W = (G + lambda I)^-1 Q is re-solved, lambda chosen
on held-out training data only (see :class:`edgecl.heads.RanPACHead`).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import pet as petlib
from ..core.formats import pack, unpack
from ..heads import CosineHead, RanPACHead
from .base import Learner, cross_entropy_step, torch_labels


def holdout_mask(labels: np.ndarray, fraction: float, seed: int) -> torch.Tensor:
    """A seeded per-class split: ``fraction`` of each class's samples marked True (held out)."""
    rng = np.random.RandomState(seed)
    mask = np.zeros(len(labels), dtype=bool)
    if fraction <= 0:
        return torch.from_numpy(mask)
    for c in np.unique(labels):
        idx = np.where(labels == c)[0]
        k = int(round(fraction * len(idx)))
        if 0 < k < len(idx):
            mask[rng.choice(idx, k, replace=False)] = True
    return torch.from_numpy(mask)


def session_holdout(cfg, t: int, images) -> torch.Tensor:
    """The rows of session ``t``'s training images a RanPAC head chooses lambda on: a seeded
    per-class split (seed ``cfg.seed + t``), the same rows whoever asks."""
    return holdout_mask(np.asarray(images.labels), cfg.ranpac.holdout_fraction, cfg.seed + t)


class RanPAC(Learner):
    name = "ranpac"

    def __init__(self, cfg, backbone, device=None):
        super().__init__(cfg, backbone, device)
        self.uses_pet = bool(cfg.pet.kinds)
        self.model = self.make_pet_model() if self.uses_pet else self.ptm
        rc = cfg.ranpac
        self.head = RanPACHead(self.ptm.feature_dim, rc.M, cfg.seed, rc.lambdas)
        self.pet_history: list = []

    def adapt(self, train, new_classes) -> None:
        """Phase 1: first-session PET adaptation with a cosine head and cross-entropy."""
        tc = self.cfg.train
        head = CosineHead(self.ptm.feature_dim, len(new_classes)).to(self.device)
        params = [
            {"params": petlib.pet_parameters(self.model.model), "lr": tc.lr},
            {"params": list(head.parameters()), "lr": tc.head_lr},
        ]
        self.pet_history = self.fit(params, train, tc.epochs, cross_entropy_step(self.model, head, self.dist),
                                    desc="session 1: PET adaptation", modules=(self.model.model,))
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.bump("adapted")

    def learn(self, t, train, new_classes):
        if t == 0 and self.uses_pet and self.cfg.train.epochs > 0:
            self.adapt(train, new_classes)
        part, rows = self.my_part(train)  # under torchrun: this rank's part, the statistics summed
        feats = self.features(self.model, "adapted", part)
        hold = session_holdout(self.cfg, t, train)[torch.as_tensor(rows)]
        self.head.add(feats, torch_labels(part), hold, num_classes=new_classes[-1] + 1, dist=self.dist)
        self.head.solve(dist=self.dist)

    def predict(self, images, rows=None):
        return {"main": self.head.logits(self.features(self.model, "adapted", images, rows)).numpy()}

    def feature_models(self):
        return {"main": self.model}

    def state(self):
        out = {"heads": pack(self.head.head_tensors(), "ranpac"), "stats": pack(self.head.stats_tensors(), "ranpac")}
        if self.uses_pet:
            out["pet"] = petlib.pet_state_dict(self.model.model)
        return out

    def meta(self):
        return {**super().meta(), "feature_dim": self.ptm.feature_dim, "head": "ranpac",
                "ranpac": {"M": self.head.M, "seed": self.head.seed, "lambda": self.head.lam},
                "pet_history": self.pet_history}

    def load_state(self, tensors, meta):
        if self.uses_pet:
            petlib.load_pet_state_dict(self.model.model, tensors["pet"])
            self.model.eval()
            self.bump("adapted")
        self.head.load_state({**unpack(tensors["heads"], "ranpac"), **unpack(tensors["stats"], "ranpac")})
        self.num_seen = self.head.num_classes
