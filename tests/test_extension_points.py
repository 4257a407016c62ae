"""docs/DESIGN.md, "What each addition touches", proved: a toy PET kind, a toy head kind and a toy
method, each written and registered in this test alone (one declaration in its registry), train,
export and run on the device with no other change to edgecl."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, invoke, make_imagefolder, one_line_error
from torch import nn

from edgecl import pet as petlib
from edgecl.core.formats import pack, unpack
from edgecl.device.heads import HEADS, Head
from edgecl.learners import REGISTRY
from edgecl.learners.simplecil import SimpleCIL

# ----------------------------------------------------------------------------- a toy PET kind


class ToyScale(petlib._Wrapper):
    """y = m(x) * s, one learnable scale per output feature of a Linear; folds into it."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(petlib._plain(base).out_features))

    def forward(self, x):
        return self.base(x) * self.scale

    @torch.no_grad()
    def fold(self) -> nn.Module:
        m = self.base
        m.weight.mul_(self.scale[:, None])
        if m.bias is not None:
            m.bias.mul_(self.scale)
        return m


def _fc2_layers(model, cfg, arch) -> list:
    return [n for n, _ in model.named_modules() if n.endswith("mlp.fc2")]


TOY_PET = petlib.PETKind("toyscale", ToyScale, order=9, foldable=True, targets=_fc2_layers,
                         wrap=lambda m, model, cfg, arch: ToyScale(m))


# ----------------------------------------------------------------------------- a toy head kind


class ToyCosineHead(Head):
    """logits = scale * cos(f, weight_c) on the device (numpy)."""

    kind = "toycos"
    required = ("weight", "scale")

    def __init__(self, tensors):
        super().__init__(tensors)
        self.weight = np.asarray(tensors["weight"], np.float32)
        self.scale = float(np.asarray(tensors["scale"]).reshape(-1)[0])

    @property
    def num_classes(self):
        return len(self.weight)

    @property
    def width(self):
        return self.weight.shape[1]

    def logits_of_inputs(self, h):
        h = np.asarray(h, np.float32)
        h = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
        return self.scale * h @ self.weight.T

    def scores(self, h):
        return self.logits_of_inputs(h)[:, self.base_classes()]


# ----------------------------------------------------------------------------- a toy method


class ToyCosine(SimpleCIL):
    """SimpleCIL whose exported head is a "toycos" head (normalised prototypes and a scale)."""

    name = "toycos"

    def state(self):
        return {"heads": pack({"weight": F.normalize(self.prototypes.means(), dim=1),
                               "scale": torch.tensor([10.0])}, "toycos")}

    def meta(self):
        return {**super().meta(), "head": "toycos"}

    def load_state(self, tensors, meta):
        weight = unpack(tensors["heads"], "toycos")["weight"]
        self.prototypes.load_state({"sums": weight, "counts": torch.ones(len(weight))})
        self.num_seen = len(weight)


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    return make_imagefolder(tmp_path / "data")


def train_and_export(data, tmp_path, method, *extra):
    bundle, eng = tmp_path / f"bundle-{method}", tmp_path / f"engine-{method}"
    res = invoke(["train", "--data", str(data), "--method", method, "--out", str(bundle), *TINY, *extra])
    assert res.exit_code == 0, res.output
    res = invoke(["export", str(bundle), "--out", str(eng)])
    assert res.exit_code == 0, res.output
    got = json.loads(invoke(["eval", str(eng), "--data", str(data), "--json"]).stdout)
    ref = json.loads(invoke(["eval", str(bundle), "--data", str(data), "--json"]).stdout)
    assert abs(got["accuracy"] - ref["accuracy"]) <= 0.1 and got["n"] == ref["n"] > 0
    return bundle, eng


def test_a_toy_pet_kind_trains_folds_and_exports(data, tmp_path, monkeypatch):
    monkeypatch.setitem(petlib.PET_KINDS, "toyscale", TOY_PET)
    bundle, eng = train_and_export(data, tmp_path, "ranpac", "--set", "pet.kinds=[toyscale]")
    from safetensors.torch import load_file

    pet = load_file(str(bundle / "pet.safetensors"))
    assert pet and all(k.endswith("mlp.fc2.scale") for k in pet)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in pet.values())  # it trained
    parity = json.loads((eng / "parity.json").read_text())["fp32"]  # folded away exactly
    assert parity["max_rel"] <= 1e-4 and parity["top1_agreement"] == 1.0


def test_a_toy_method_with_a_toy_head_kind_runs_on_the_device(data, tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "toycos", (__name__, "ToyCosine"))
    monkeypatch.setitem(HEADS, "toycos", ToyCosineHead)
    assert "toycos" in invoke(["train", "--help"]).stdout  # the CLI lists it from the registry
    bundle, eng = train_and_export(data, tmp_path, "toycos")
    manifest = json.loads((eng / "manifest.json").read_text())
    assert manifest["learners"]["main"]["head"] == "toycos"
    first = sorted((data / "val").iterdir())[0]
    ran = invoke(["run", str(eng), "--source", str(first), "--headless", "--store", str(tmp_path / "s")])
    assert ran.exit_code == 0 and json.loads(ran.stdout.strip().splitlines()[-1])["frames"] > 0, ran.output
    enroll = ["enroll", str(eng), "--name", "new", "--images", str(first), "--store", str(tmp_path / "s")]
    one_line_error(invoke(enroll), "'toycos' head", "cannot enroll")


def test_an_unregistered_head_kind_is_refused_in_one_line(data, tmp_path, monkeypatch):
    """Without the head registered, the exporter refuses the bundle naming the kind."""
    monkeypatch.setitem(REGISTRY, "toycos", (__name__, "ToyCosine"))
    bundle = tmp_path / "bundle"
    assert invoke(["train", "--data", str(data), "--method", "toycos", "--out", str(bundle), *TINY]).exit_code == 0
    one_line_error(invoke(["export", str(bundle), "--out", str(tmp_path / "eng")]), "head kind 'toycos'")
