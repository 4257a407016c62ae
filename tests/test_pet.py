"""PET modules: identity at init, exact folding, frozen BN statistics, state dicts, errors."""

import copy
import io

import pytest
import timm
import torch
from helpers import PET_FOLDED, PET_KEPT, PET_RANDOM_INIT, PET_VIT_ONLY, cnn_pet_kinds, pet_kinds
from torch import nn

from edgecl.config import PETConfig
from edgecl.core.errors import EdgeclError
from edgecl.pet import (
    SSF,
    Adapter,
    DeepVPT,
    LoRA,
    _trainable_named,
    count_parameters,
    fold_pet,
    freeze_for_pet,
    inject_pet,
    load_pet_state_dict,
    pet_parameters,
    pet_state_dict,
    set_pet_train_mode,
    unfolded,
)

# every kind alone, the folded kinds together, all kinds (the ones a CNN takes, on the CNN)
VIT_KINDS = [[k] for k in pet_kinds()] + [list(PET_FOLDED), pet_kinds()]
CNN_KINDS = [[k] for k in cnn_pet_kinds()] + [list(PET_FOLDED), cnn_pet_kinds()]
# convs without bias that get one when an SSF is folded into them (EfficientNet convs feed BN)
CNN_CREATED_BIASES = ("conv_stem", "conv_dw", "conv_pw", "conv_pwl", "conv_head")


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
    return model.eval()


def make_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0,
                             img_size=32, patch_size=8, depth=2).eval()


_CNN = None


def make_cnn():
    global _CNN
    if _CNN is None:
        torch.manual_seed(0)
        _CNN = _randomize_norms(timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0))
    return copy.deepcopy(_CNN)


ARCHS = {"vit": (make_vit, 32, VIT_KINDS), "cnn": (make_cnn, 64, CNN_KINDS)}
CASES = [(a, k) for a, (_, _, kinds) in ARCHS.items() for k in kinds]
CASE_IDS = [f"{a}-{'+'.join(k)}" for a, k in CASES]


def _input(arch, n=2):
    return torch.randn(n, 3, ARCHS[arch][1], ARCHS[arch][1], generator=torch.Generator().manual_seed(2))


def _randomize_pet(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pet_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _wrapper_count(model, types=(SSF, LoRA)):
    return sum(isinstance(m, types) for m in model.modules())


def test_every_kind_is_described_for_the_tests():
    """helpers' PET tables cover every kind of edgecl.pet.KINDS (a new kind is folded or kept,
    and the tests above then cover it)."""
    assert set(PET_FOLDED) | set(PET_KEPT) == set(pet_kinds()) and not set(PET_FOLDED) & set(PET_KEPT)
    assert set(PET_RANDOM_INIT) | set(PET_VIT_ONLY) <= set(pet_kinds())


@pytest.mark.parametrize("arch,kinds", CASES, ids=CASE_IDS)
def test_identity_at_init_and_exact_fold(arch, kinds):
    bare = ARCHS[arch][0]()
    model = copy.deepcopy(bare)
    names = inject_pet(model, PETConfig(kinds=kinds))
    assert names and len(names) == len(set(names))
    x = _input(arch)
    with torch.no_grad():
        ref = bare(x)
        out = model(x)
    if not set(kinds) & set(PET_RANDOM_INIT):  # prompts are random at init; ssf / lora / adapter are the identity
        assert torch.allclose(out, ref, atol=1e-6)
    _randomize_pet(model)
    n_kept = _wrapper_count(model, (Adapter, DeepVPT))
    model64 = copy.deepcopy(model).double()
    x64 = x.double() if arch == "vit" else x[:1, :, :32, :32].double()  # float64 convs are slow on CPU
    with torch.no_grad():
        before, before64 = model(x), model64(x64)
        assert (before - ref).abs().max() > 1e-3  # the randomised PET really changes the output
        after, after64 = fold_pet(model)(x), fold_pet(model64)(x64)
    assert (after64 - before64).abs().max() < 1e-10  # folding is exact
    # float32: the random-init lite0 amplifies rounding (its own float32 output is ~2e-5 off float64);
    # with the pretrained lite0 weights at 224 px the float32 fold difference is < 1e-5
    assert (after - before).abs().max() < (1e-5 if arch == "vit" else 5e-5)
    assert _wrapper_count(model) == 0 and _wrapper_count(model, (Adapter, DeepVPT)) == n_kept
    assert (n_kept > 0) == bool(set(PET_KEPT) & set(kinds))
    if set(kinds) <= set(PET_FOLDED):
        bare_sd, sd = bare.state_dict(), model.state_dict()
        created = set(sd) - set(bare_sd)
        assert set(bare_sd) <= set(sd)
        assert all(sd[k].shape == v.shape for k, v in bare_sd.items())
        if arch == "vit" or kinds == ["lora"]:
            assert not created
        else:
            assert created and all(k.endswith(".bias") and k.split(".")[-2] in CNN_CREATED_BIASES
                                   for k in created)


def test_timm_api_survives_wrappers():
    model = make_vit()
    inject_pet(model, PETConfig(kinds=pet_kinds()))
    x = _input("vit")
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 192)  # VPT prompts are stripped again
    assert model.forward_head(feats).shape == (2, 192)
    assert model.blocks[0].attn.qkv.weight.shape == (576, 192)  # attribute reads reach the wrapped layer
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    cnn = make_cnn()
    inject_pet(cnn, PETConfig(kinds=cnn_pet_kinds()))
    assert cnn.blocks[1][0].conv_pw.in_channels == 16
    cnn.reset_classifier(5)
    assert cnn(_input("cnn")).shape == (2, 5)


def test_onnx_export_with_ordinary_ops():
    pytest.importorskip("onnx")
    model = make_vit()
    inject_pet(model, PETConfig(kinds=pet_kinds()))
    fold_pet(model)
    buf = io.BytesIO()
    torch.onnx.export(model, (_input("vit"),), buf, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    assert buf.getbuffer().nbytes > 0


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


def test_train_mode_keeps_bn_statistics_and_grads_flow():
    model = make_cnn()
    inject_pet(model, PETConfig(kinds=["ssf", "adapter"], tune_norms=True))
    freeze_for_pet(model)
    stats = _bn_stats(model)
    set_pet_train_mode(model, True)
    assert model.training and all(not m.training for m in model.modules()
                                  if isinstance(m, nn.modules.batchnorm._BatchNorm))
    model(_input("cnn")).square().mean().backward()
    assert all(torch.equal(stats[k], v) for k, v in _bn_stats(model).items())
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
        if p.grad is not None and ".down." not in n:  # adapters' down gets grads once up leaves 0
            assert p.grad.abs().sum() > 0, n
    set_pet_train_mode(model, False)
    assert not any(m.training for m in model.modules())


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_selects_intended_parameters():
    model = make_cnn()
    inject_pet(model, PETConfig(kinds=["ssf", "lora"]))
    freeze_for_pet(model)
    names = _trainable_names(model)
    assert names and all(n.rsplit(".", 1)[-1] in ("gamma", "beta") or ".A." in n or ".B." in n for n in names)
    assert count_parameters(model)["trainable"] == sum(p.numel() for p in pet_parameters(model))

    model = make_cnn()
    inject_pet(model, PETConfig(kinds=["ssf"], tune_norms=True))
    freeze_for_pet(model)
    names = _trainable_names(model)
    assert "bn1.weight" in names and "bn1.bias" in names and "blocks.0.0.bn1.weight" in names
    assert not any(n.endswith("conv_pw.base.weight") for n in names)

    model = make_vit()
    inject_pet(model, PETConfig(kinds=["lora"], tune_biases=True))
    freeze_for_pet(model)
    names = _trainable_names(model)
    assert "blocks.0.attn.qkv.base.bias" in names and "blocks.0.mlp.fc1.bias" in names
    assert "blocks.0.norm1.bias" in names and "blocks.0.norm1.weight" not in names
    assert "blocks.0.attn.qkv.base.weight" not in names and "blocks.0.attn.qkv.A.weight" in names


def test_pet_state_dict_roundtrip_and_strictness():
    cfg = PETConfig(kinds=pet_kinds(), tune_norms=True)
    model = make_vit()
    inject_pet(model, cfg)
    _randomize_pet(model)
    sd = pet_state_dict(model)
    assert set(sd) == {n for n, p in model.named_parameters() if any(p is q for q in pet_parameters(model))}
    fresh = make_vit()
    inject_pet(fresh, cfg)
    load_pet_state_dict(fresh, sd)
    x = _input("vit")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    bad["blocks.9.nope"] = torch.zeros(1)
    with pytest.raises(EdgeclError, match="missing keys: .*unexpected keys: blocks.9.nope"):
        load_pet_state_dict(fresh, bad)
    other = make_vit()
    inject_pet(other, PETConfig(kinds=["ssf"]))
    with pytest.raises(EdgeclError, match="unexpected keys"):
        load_pet_state_dict(other, sd)
    shaped = {k: (v[:1] if k.endswith("prompts") else v) for k, v in sd.items()}
    with pytest.raises(EdgeclError, match="shape mismatch"):
        load_pet_state_dict(fresh, shaped)


def test_errors():
    with pytest.raises(EdgeclError, match="'vpt' needs a timm VisionTransformer"):
        inject_pet(make_cnn(), PETConfig(kinds=["vpt"]))
    with pytest.raises(EdgeclError, match=r"pet\.kinds.*valid kinds: " + ", ".join(pet_kinds())):
        inject_pet(make_vit(), PETConfig(kinds=["prefix"]))
    with pytest.raises(EdgeclError, match=r"pet\.lora_targets"):
        inject_pet(make_vit(), PETConfig(kinds=["lora"], lora_targets=[r"no_such_layer"]))
    model = make_vit()
    inject_pet(model, PETConfig(kinds=["ssf"]))
    with pytest.raises(EdgeclError, match="already has PET modules"):
        inject_pet(model, PETConfig(kinds=["ssf"]))


def test_explicit_targets_override_auto():
    model = make_vit()
    names = inject_pet(model, PETConfig(kinds=["ssf", "lora"], ssf_targets=[r"mlp\.fc2$"],
                                        lora_targets=[r"attn\.proj$", r"mlp\.fc1$"]))
    assert names == ["blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.1.attn.proj", "blocks.1.mlp.fc1",
                     "blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert isinstance(model.blocks[0].mlp.fc1, LoRA) and isinstance(model.blocks[0].attn.qkv, nn.Linear)


def test_unknown_architecture_by_module_type():
    torch.manual_seed(0)
    bare = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    model = copy.deepcopy(bare)
    names = inject_pet(model, PETConfig(kinds=["ssf", "lora"]))
    assert names == ["3", "6", "0"]  # LoRA on the 1x1 conv and the Linear, SSF on every conv / Linear
    _randomize_pet(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        after = fold_pet(model)(x)
    assert (after - before).abs().max() < 1e-5
    with pytest.raises(EdgeclError, match="'adapter' supports"):
        inject_pet(copy.deepcopy(bare), PETConfig(kinds=["adapter"]))
    with pytest.raises(EdgeclError, match="'lora' found no module"):
        inject_pet(nn.Sequential(nn.Conv2d(3, 8, 3)), PETConfig(kinds=["lora"]))


@pytest.mark.parametrize("arch,kinds", [("vit", pet_kinds()), ("cnn", cnn_pet_kinds())], ids=["vit", "cnn"])
def test_sgd_steps_change_only_pet_parameters(arch, kinds):
    model = ARCHS[arch][0]()
    inject_pet(model, PETConfig(kinds=kinds))
    freeze_for_pet(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pet_names = set(pet_state_dict(model))
    opt = torch.optim.SGD(pet_parameters(model), lr=0.5)
    set_pet_train_mode(model, True)
    x, target = _input(arch), torch.randn(2, model.num_features)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= pet_names
    assert any(k.endswith(".B.weight") for k in changed)  # LoRA's zero-init B moves off zero


def _slcapp_pet() -> PETConfig:
    """SLCA++'s PET as configs/slcapp.yaml sets it (the authors' LoRA)."""
    from edgecl.config import resolve_config

    return resolve_config("slcapp", "quick", None, {}).pet


def test_slcapp_lora_as_published_on_a_vit_folds_exactly():
    """LoRA on every block's attn.qkv and mlp.fc1 / fc2, A from the SVD of the wrapped weight,
    scale 0.8, the class token trained (SLCA++ code, convs/vits.py): folding is exact."""
    cfg = _slcapp_pet()
    assert (cfg.lora_init, cfg.lora_alpha / cfg.lora_rank, cfg.tune_cls_token) == ("svd", 0.8, True)
    model = make_vit()
    plain = copy.deepcopy(model)
    names = inject_pet(model, cfg)
    assert set(names) == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1", "mlp.fc2")}
    lora = model.blocks[0].mlp.fc1
    w = plain.blocks[0].mlp.fc1.weight.detach().double()
    vh = torch.linalg.svd(w, full_matrices=False)[2][:cfg.lora_rank]
    torch.testing.assert_close(lora.A.weight.double(), vh, atol=1e-6, rtol=0)  # the top right singular vectors
    assert lora.scale == pytest.approx(0.8) and float(lora.B.weight.detach().abs().max()) == 0.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # B = 0: the identity at init
    trainable = {n for n, _ in _trainable_named(model)}  # what pet_parameters returns, by name
    assert "cls_token" in trainable and "blocks.1.mlp.fc2.A.weight" in trainable
    _randomize_pet(model)
    with torch.no_grad():
        want = model(x)
        folded = fold_pet(copy.deepcopy(model))
        assert not unfolded(folded)
        torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=0)


def test_slcapp_lora_on_efficientnet_wraps_the_bottleneck_convs():
    """EfficientNet's equivalent: conv_pw / conv_pwl (the MLP's fc1 / fc2), SE convs where there
    are any (EfficientNet-Lite has none), not conv_head; exact folding."""
    model = make_cnn()
    plain = copy.deepcopy(model)
    names = inject_pet(model, _slcapp_pet())
    assert names and all(n.rsplit(".", 1)[-1] in ("conv_pw", "conv_pwl") for n in names)
    assert "blocks.1.0.conv_pw" in names and "blocks.1.0.conv_pwl" in names and "conv_head" not in names
    _randomize_pet(model)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)  # float64: the random-init lite0 amplifies float32 rounding
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        want = model64(x)
        assert (want - plain.double()(x)).abs().max() > 1e-3  # the LoRA changed the features
        assert (fold_pet(model64)(x) - want).abs().max() < 1e-10  # folding is exact
    se = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    se_names = inject_pet(se, _slcapp_pet())
    assert "blocks.1.0.se.conv_reduce" in se_names and "blocks.1.0.se.conv_expand" in se_names
