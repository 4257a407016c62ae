"""PET folding and the exported graph.

:func:`folded_feature_models` takes ``learner.feature_models()`` (``{"main": m}``; SAFE:
``{"slow": m, "fast": m}``), deep-copies each model and folds SSF and LoRA into the weights
they wrap (:func:`edgecl.pet.fold_pet`); adapters and prompts stay. :class:`ExportGraph` puts
the preprocessing in front (uint8 NHWC frame in the camera's channel order -> normalised float
NCHW, :class:`edgecl.backbones.Normalize`) and returns one feature tensor per learner.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from edgecl import pet as petlib
from edgecl.backbones import Normalize

INPUT_NAME = "input"
OPSET = 17


def output_name(learner: str) -> str:
    return f"features_{learner}"


def fold(model: nn.Module) -> nn.Module:
    """A folded copy of ``model`` (eval mode, no grad): the foldable PET kinds (SSF, LoRA) gone,
    the others (adapters, VPT) kept."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    petlib.fold_pet(model)
    left = petlib.unfolded(model)
    if left:  # pragma: no cover - fold_pet removes them all
        raise RuntimeError(f"folding left {len(left)} PET wrappers: {sorted(set(left))}")
    return model


def folded_feature_models(learner) -> dict:
    return {name: fold(m) for name, m in learner.feature_models().items()}


def static_same_padding(graph: nn.Module, size: int) -> int:
    """Resolve TensorFlow-style "SAME" padding for the export's fixed input ``size`` (uint8 NHWC frames).

    timm's ``Conv2dSame`` (the ``tf_`` EfficientNets) computes its padding from the input's
    shape at run time; traced to ONNX that becomes a Shape/Gather/Ceil/Pad subgraph per
    convolution, which ONNX Runtime's quantizer then quantizes like data (int8 pad amounts:
    the INT8 model was wrong), and which TensorRT has to evaluate at run time. The graph's
    input size is fixed, so each one is replaced by a constant ``ZeroPad2d`` and the same
    convolution with padding 0 (exact). Returns the number of convolutions replaced.
    """
    from timm.layers import Conv2dSame

    shapes, hooks = {}, []

    def record(name):
        def hook(module, args):
            shapes[name] = tuple(args[0].shape[-2:])
        return hook

    for name, m in graph.named_modules():
        if isinstance(m, Conv2dSame):
            hooks.append(m.register_forward_pre_hook(record(name)))
    with torch.no_grad():
        graph(torch.zeros(1, size, size, 3, dtype=torch.uint8))
    for h in hooks:
        h.remove()
    for name, (ih, iw) in shapes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = graph.get_submodule(parent_name) if parent_name else graph
        conv = getattr(parent, attr)
        pads = []
        for extent, k, s, d in zip((iw, ih), conv.kernel_size[::-1], conv.stride[::-1], conv.dilation[::-1]):
            total = max((math.ceil(extent / s) - 1) * s + (k - 1) * d + 1 - extent, 0)
            pads += [total // 2, total - total // 2]
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, conv.bias is not None)
        plain.load_state_dict(conv.state_dict())
        setattr(parent, attr, nn.Sequential(nn.ZeroPad2d(tuple(pads)), plain) if any(pads) else plain)
    return len(shapes)


class ExportGraph(nn.Module):
    """uint8 [B, H, W, 3] frame -> (features_<learner> for each learner), one graph."""

    def __init__(self, models: dict, mean, std, channel_order: str = "BGR"):
        super().__init__()
        self.normalize = Normalize(mean, std, channel_order=channel_order)
        self.names = list(models)
        self.models = nn.ModuleDict(models)

    def forward(self, x: torch.Tensor):
        x = self.normalize(x)
        return tuple(self.models[n](x) for n in self.names)


def export_onnx(graph: ExportGraph, path, size: int, opset: int = OPSET) -> None:
    """torch.onnx.export (TorchScript exporter), dynamic batch, then ``onnx.checker`` full check."""
    import warnings

    import onnx

    graph = graph.eval()
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    outputs = [output_name(n) for n in graph.names]
    axes = {INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(input_names=[INPUT_NAME], output_names=outputs, dynamic_axes=axes,
                      opset_version=opset, do_constant_folding=True)
        try:
            torch.onnx.export(graph, (dummy,), str(path), dynamo=False, **kwargs)
        except TypeError:  # older torch without the dynamo argument
            torch.onnx.export(graph, (dummy,), str(path), **kwargs)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)


def onnx_op_counts(path) -> dict:
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node))
