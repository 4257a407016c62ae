"""End to end: `edgecl train` -> bundle -> `edgecl eval`, on generated images and a small
random-init ViT (seconds on a CPU), plus the user errors of the CLI."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgecl.cli import cli

TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random",
        "--set", "backbone.kwargs={img_size: 32, patch_size: 8, depth: 2}",
        "--set", "data.input_size=32", "--set", "ranpac.M=64", "--set", "train.batch_size=8",
        "--split", "B0Inc2", "--epochs", "1", "--no-progress"]


def blob_images(classes, n=8, seed=0, num_names=4, key="test"):
    """An in-memory ImageSet: per class ``n`` noisy 32x32 images around one random colour."""
    from edgecl.data import ImageSet

    rng = np.random.RandomState(seed)
    imgs, labels = [], []
    for c in classes:
        base = rng.randint(0, 255, size=3)
        imgs.append(np.clip(base + rng.randn(n, 32, 32, 3) * 30, 0, 255).astype(np.uint8))
        labels += [c] * n
    return ImageSet(np.concatenate(imgs), np.array(labels, dtype=np.int64), [f"c{c}" for c in range(num_names)],
                    key=f"{key}-{seed}-{classes}")


def make_imagefolder(root, n_classes=4, n_train=10, n_val=4, size=32, seed=0):
    """Classes that differ by colour and stripe direction, with noise."""
    rng = np.random.RandomState(seed)
    for c in range(n_classes):
        base = rng.randint(0, 255, size=3)
        for split, n in (("train", n_train), ("val", n_val)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(base + rng.randn(size, size, 3) * 25, 0, 255)
                img[:: 4 if c % 2 else 1, :: 1 if c % 2 else 4] = 255
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "cache"))
    return make_imagefolder(tmp_path / "data")


def invoke(args):
    res = CliRunner().invoke(cli, args)
    return res


@pytest.mark.parametrize("method", ["simplecil", "ranpac", "safe"])
def test_train_bundle_eval_and_reproducibility(folder, tmp_path, method):
    out = tmp_path / f"bundle-{method}"
    res = invoke(["train", "--data", str(folder), "--method", method, "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    assert f"bundle: {out}" in res.output and "session 2/2" in res.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "accuracy_matrix", "A_last", "A_avg", "forgetting"):
        assert key in metrics
    # the run's time split into learning and the per-session test, both inside the total
    assert metrics["learn_s"] > 0 and metrics["eval_s"] > 0
    assert metrics["learn_s"] + metrics["eval_s"] <= metrics["time_s"] + 0.2
    assert len(metrics["accuracy"]) == 2 and len(metrics["accuracy_matrix"][1]) == 2
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and len(manifest["classes"]["names"]) == 4
    assert set(manifest["files"]) >= {"backbone.safetensors", "heads.safetensors", "metrics.json", "accuracy.png"}
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    # eval reproduces the final accuracy from the bundle alone
    res = invoke(["eval", str(out), "--data", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["n"] == 16 and result["accuracy"] == pytest.approx(metrics["A_last"], abs=1e-6)

    # same seed -> same numbers (and same heads)
    again = tmp_path / f"again-{method}"
    assert invoke(["train", "--data", str(folder), "--method", method, "--out", str(again), *TINY]).exit_code == 0
    assert json.loads((again / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]
    assert (again / "heads.safetensors").read_bytes() == (out / "heads.safetensors").read_bytes()


def test_bundle_write_replaces_atomically_and_detects_damage(folder, tmp_path):
    out = tmp_path / "b"
    args = ["train", "--data", str(folder), "--method", "simplecil", "--out", str(out), *TINY]
    assert invoke(args).exit_code == 0
    assert invoke(args).exit_code == 0  # overwriting an existing bundle works
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # no temp or old dirs left
    with open(out / "heads.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00")
    res = invoke(["eval", str(out), "--data", str(folder), "--json"])
    assert res.exit_code == 2 and "heads.safetensors does not match" in res.output
    (out / "heads.safetensors").unlink()
    res = invoke(["eval", str(out), "--data", str(folder)])
    assert res.exit_code == 2 and "incomplete" in res.output


def test_bundle_from_unknown_format_version_is_refused(folder, tmp_path):
    out = tmp_path / "b"
    assert invoke(["train", "--data", str(folder), "--method", "simplecil", "--out", str(out), *TINY]).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(manifest))
    res = invoke(["eval", str(out), "--data", str(folder)])
    assert res.exit_code == 2 and "format version 99" in res.output


def one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("edgecl: error:") and "\n" not in text, text
    for needle in needles:
        assert needle in text, text


def test_user_errors_are_one_line(folder, tmp_path):
    out = str(tmp_path / "b")
    # a corrupt image names the file
    bad = folder / "train" / "class1" / "zz_broken.png"
    bad.write_bytes(b"not an image at all")
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecil", "--out", out, *TINY]),
                   "zz_broken.png")
    bad.unlink()
    # an empty class folder names the folder
    (folder / "train" / "class9").mkdir()
    (folder / "val" / "class9").mkdir()
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecil", "--out", out, *TINY]), "class9")
    (folder / "train" / "class9").rmdir()
    (folder / "val" / "class9").rmdir()
    # a missing data path, an unknown method, an unknown backbone
    one_line_error(invoke(["train", "--data", str(tmp_path / "nowhere"), "--method", "simplecil", "--out", out]),
                   "nowhere", "--data")
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecli", "--out", out]),
                   "unknown method 'simplecli'")
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecil", "--backbone", "effnet_lite9",
                           "--out", out, "--no-progress"]), "effnet_lite9", "--backbone")
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecil", "--profile", "huge",
                           "--out", out]), "huge")
