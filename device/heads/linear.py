"""The linear head (SLCA / SLCA++: the aligned per-session heads, concatenated) on the device:
logits = f @ weight.T + bias. Tensors: ``weight`` (C x d), ``bias`` (C), ``blocks`` (classes per
session). The device runs it and renames or removes its classes; enrollment (classifier
alignment from stored class statistics) is not implemented yet."""

from __future__ import annotations

import numpy as np

from .base import Head, register_head


@register_head
class LinearHead(Head):
    kind = "linear"
    required = ("weight",)
    enrollable = False

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.weight = np.asarray(tensors["weight"], np.float32)
        bias = tensors.get("bias")
        self.bias = np.zeros(len(self.weight), np.float32) if bias is None else np.asarray(bias, np.float32)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    def logits_of_inputs(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, np.float32) @ self.weight.T + self.bias

    def scores(self, h: np.ndarray) -> np.ndarray:
        base = self.base_classes()  # engine classes only: a linear head does not enroll
        return np.asarray(h, np.float32) @ self.weight[base].T + self.bias[base]
