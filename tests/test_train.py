"""End to end: `edgecl train` -> bundle -> `edgecl eval`, on generated images and a small
random-init ViT (seconds on a CPU), plus the user errors of the CLI."""

import json

import pytest
from helpers import TINY, generic_methods, invoke, one_line_error


# every method of the registry but the SLCA family (tests/test_slca.py, with its linear-head checks)
@pytest.mark.parametrize("method", generic_methods())
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


def test_user_errors_are_one_line(folder, tmp_path):
    out = str(tmp_path / "b")
    train = ["train", "--data", str(folder), "--method", "simplecil", "--out", out]
    # (quiet: train fails before it logs anything, the error line is the whole output)
    # a corrupt image names the file
    bad = folder / "train" / "class1" / "zz_broken.png"
    bad.write_bytes(b"not an image at all")
    one_line_error(invoke([*train, *TINY]), "zz_broken.png", quiet=True)
    bad.unlink()
    # an empty class folder names the folder
    (folder / "train" / "class9").mkdir()
    (folder / "val" / "class9").mkdir()
    one_line_error(invoke([*train, *TINY]), "class9", quiet=True)
    (folder / "train" / "class9").rmdir()
    (folder / "val" / "class9").rmdir()
    # a missing data path, an unknown method, an unknown backbone
    one_line_error(invoke(["train", "--data", str(tmp_path / "nowhere"), "--method", "simplecil", "--out", out]),
                   "nowhere", "--data", quiet=True)
    one_line_error(invoke(["train", "--data", str(folder), "--method", "simplecli", "--out", out]),
                   "unknown method 'simplecli'", quiet=True)
    one_line_error(invoke([*train, "--backbone", "effnet_lite9", "--no-progress"]), "effnet_lite9", "--backbone",
                   quiet=True)
    one_line_error(invoke([*train, "--profile", "huge"]), "huge", quiet=True)


def test_bf16_autocasts_the_steps_and_leaves_the_statistics_in_float32(monkeypatch):
    """train.precision=bf16 (docs/DESIGN.md, "Training on several processes"): the training steps
    run under bf16 autocast; features for G and Q are taken outside it, in float32, and G and Q
    are accumulated in float64."""
    import torch
    from helpers import TINY_VIT, blob_images

    from edgecl.backbones import create_backbone
    from edgecl.config import resolve_config
    from edgecl.learners import base
    from edgecl.learners.ranpac import RanPAC

    cfg = resolve_config("ranpac", overrides={
        "backbone": TINY_VIT, "pet": {"kinds": ["ssf"]}, "data": {"input_size": 32}, "ranpac": {"M": 64},
        "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "precision": "bf16"}})
    torch.manual_seed(0)
    learner = RanPAC(cfg, create_backbone(cfg.backbone.name, "random", **cfg.backbone.kwargs))
    learner.progress = False
    seen = []
    plain = base.cross_entropy_step

    def spying_step(model, head, dist=base.SINGLE):
        step = plain(model, head, dist)

        def spy(x, y):
            seen.append(torch.is_autocast_enabled("cpu"))
            return step(x, y)
        return spy

    monkeypatch.setattr("edgecl.learners.ranpac.cross_entropy_step", spying_step)
    train = blob_images([0, 1], n=12, seed=0)
    learner.learn(0, train, [0, 1])
    assert seen and all(seen)
    feats = learner.features(learner.model, "adapted", train)
    assert feats.dtype == torch.float32 and learner.head.G.dtype == torch.float64
    h = learner.head.project(feats).double()
    assert torch.allclose(learner.head.G, h.T @ h, rtol=1e-6)
