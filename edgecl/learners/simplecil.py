"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", 2023): the frozen pretrained backbone and a
cosine classifier whose weights are the class means (prototypes) of its features."""

from __future__ import annotations

from ..core.formats import pack, unpack
from ..heads import Prototypes
from .base import Learner, torch_labels


class SimpleCIL(Learner):
    name = "simplecil"

    def __init__(self, cfg, backbone, device=None):
        super().__init__(cfg, backbone, device)
        self.prototypes = Prototypes(self.ptm.feature_dim)

    def learn(self, t, train, new_classes):
        part, _rows = self.my_part(train)  # under torchrun: this rank's part, the sums summed
        feats = self.features(self.ptm, "ptm", part)
        self.prototypes.add(feats, torch_labels(part), num_classes=new_classes[-1] + 1, dist=self.dist)

    def predict(self, images, rows=None):
        return {"main": self.prototypes.logits(self.features(self.ptm, "ptm", images, rows)).numpy()}

    def state(self):
        return {"heads": pack(self.prototypes.state(), "prototypes")}

    def meta(self):
        return {**super().meta(), "feature_dim": self.ptm.feature_dim, "head": "prototypes"}

    def load_state(self, tensors, meta):
        self.prototypes.load_state(unpack(tensors["heads"], "prototypes"))
        self.num_seen = self.prototypes.num_classes

