"""Tests for edgecl.data: decode cache, ImageFolder errors, scenarios, batch augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgecl.config import DataConfig
from edgecl.core.errors import EdgeclError
from edgecl.data import (
    Scenario,
    augment_batch,
    build_scenario,
    imagenet_r_split,
    iterate_batches,
    load_dataset,
    load_imagefolder,
    parse_split,
)
from edgecl.data import imagefolder as D


def _write_image(path: Path, color, size=(20, 16), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[...] = color
    arr[: size[1] // 2, : size[0] // 2] = 255 - np.asarray(color, dtype=np.uint8)  # a corner marker
    Image.fromarray(arr).save(path, format=fmt)


def make_tree(root: Path, classes=("cat", "dog"), names=("x_1.png", "x_10.png", "x_2.png"), size=(20, 16)) -> Path:
    """root/<class>/<names>: each image a flat colour per (class, file) with a marker corner."""
    for ci, cname in enumerate(classes):
        for fi, name in enumerate(names):
            _write_image(root / cname / name, (40 * ci + 10, (20 * fi + 30) % 256, 100), size=size)
    return root


def _one_line_error(excinfo, *needles) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------- cache


def test_load_shapes_labels_and_cache_hit(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "data")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"garbage")
    s = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    assert s.images.shape == (6, 8, 8, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.class_names == ["cat", "dog"] and len(s) == 6
    assert len(list((cache / "images").glob("*.npy"))) == 1
    assert not list((cache / "images").glob("*tmp*"))

    def boom(*a, **k):
        raise AssertionError("decoded again: cache miss")

    monkeypatch.setattr(D, "decode_files", boom)
    again = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
    assert again.key == s.key
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(s.images))


def test_cache_invalidation(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "data")
    first = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    calls = []
    real = D.decode_files
    monkeypatch.setattr(D, "decode_files", lambda *a, **k: (calls.append(1), real(*a, **k)))

    other_size = load_imagefolder(root, size=6, cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 1 and other_size.images.shape == (6, 6, 6, 3) and other_size.key != first.key

    path = root / "dog" / "x_2.png"
    _write_image(path, (1, 2, 3), size=(24, 16))  # new content, size and mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 2 and changed.key != first.key

    fewer = load_imagefolder(root, size=8, per_class=2, cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 3 and len(fewer) == 4
    load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    assert len(calls) == 3  # back to the changed tree: a hit


def test_per_class_keeps_first_sorted_names_and_decode_geometry(tmp_path, cache):
    root = tmp_path / "data"
    # a distinct grey level per file; non-square 30x20 images: shorter side 20 -> 10, crop 10x10
    for name, grey in (("x_1.png", 10), ("x_10.png", 20), ("x_2.png", 30), ("x_3.png", 40)):
        _write_image(root / "a" / name, (grey, grey, grey), size=(30, 20))
    s = load_imagefolder(root, size=10, per_class=2, cache_dir=cache, workers=1, progress=False)
    assert len(s) == 2
    # lexicographic order: x_1, x_10 (not x_2)
    assert [int(np.median(s.images[i])) for i in range(2)] == [10, 20]
    # centre crop of a 15x10 resize keeps most of the 15x10 marker's right edge at column 2
    ref = np.asarray(Image.open(root / "a" / "x_1.png").resize((15, 10), Image.BICUBIC))[:, 2:12]
    np.testing.assert_array_equal(s.images[0], ref)


def test_pool_decode_matches_in_process(tmp_path, cache):
    root = make_tree(tmp_path / "data", classes=("a", "b", "c"), names=[f"im_{i:03d}.jpg" for i in range(12)])
    one = load_imagefolder(root, size=12, cache_dir=cache / "one", workers=1, progress=False)
    two = load_imagefolder(root, size=12, cache_dir=cache / "two", workers=2, progress=False)
    assert one.key == two.key
    np.testing.assert_array_equal(np.asarray(one.images), np.asarray(two.images))


def test_a_decode_worker_that_dies_does_not_hang_the_load(tmp_path, cache, monkeypatch):
    """multiprocessing.Pool waits forever for the result of a worker that died (killed, out of
    memory); the decode pool notices it and decodes what was left in the process."""
    from edgecl.data import decode

    root = make_tree(tmp_path / "data", classes=("a", "b", "c"), names=[f"im_{i:03d}.jpg" for i in range(12)])
    one = load_imagefolder(root, size=12, cache_dir=cache / "one", workers=1, progress=False)
    parent, real = os.getpid(), decode._decode_one

    def dies(path, size):  # the first image of the first chunk: its worker vanishes
        if os.getpid() != parent and Path(path).parent.name == "a" and Path(path).name == "im_000.jpg":
            os._exit(9)
        return real(path, size)

    monkeypatch.setattr(decode, "_decode_one", dies)  # the forked workers inherit it
    two = load_imagefolder(root, size=12, cache_dir=cache / "two", workers=2, progress=False)
    np.testing.assert_array_equal(np.asarray(one.images), np.asarray(two.images))


class _Inherited:
    """Cyclic garbage whose destructor records the process that ran it (as an ONNX Runtime session
    would destroy its thread pool's condition variables: in a forked child that hangs)."""

    def __init__(self, log: Path):
        self.log, self.me = log, self

    def __del__(self):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_decode_workers_never_run_inherited_destructors(tmp_path, cache, monkeypatch):
    import gc

    from edgecl.data import decode

    root = make_tree(tmp_path / "data", classes=("a", "b", "c"), names=[f"im_{i:03d}.jpg" for i in range(12)])
    log = tmp_path / "del.log"
    real = decode._decode_one

    def collecting(path, size):  # a worker whose collector runs (as it would, some time)
        gc.collect()
        return real(path, size)

    monkeypatch.setattr(decode, "_decode_one", collecting)  # the forked workers inherit it
    gc.disable()  # keep the garbage for the children to find, unless the parent collects it first
    try:
        _Inherited(log)
        load_imagefolder(root, size=12, cache_dir=cache, workers=2, progress=False)
    finally:
        gc.enable()
    gc.collect()
    assert log.read_text().split() == [str(os.getpid())]  # freed once, by this process


def test_interrupted_cache_write_is_not_trusted(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "data")

    def killed(paths, npy_path, out, *a, **k):
        out[0] = 7
        raise KeyboardInterrupt

    monkeypatch.setattr(D, "decode_files", killed)
    with pytest.raises(KeyboardInterrupt):
        load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    assert not list((cache / "images").iterdir())
    monkeypatch.undo()
    # a half-written entry (array in place, no JSON) is rebuilt rather than trusted
    s = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    expected = np.array(s.images)
    (cache / "images" / f"{s.key}.json").unlink()
    np.save(cache / "images" / f"{s.key}.npy", np.zeros((6, 8, 8, 3), np.uint8))
    again = load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    np.testing.assert_array_equal(np.asarray(again.images), expected)


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECL_CACHE", str(tmp_path / "envcache"))
    root = make_tree(tmp_path / "data")
    load_imagefolder(root, size=4, workers=1, progress=False)
    assert list((tmp_path / "envcache" / "images").glob("*.npy"))


def test_subset_and_select_classes(tmp_path, cache):
    s = load_imagefolder(make_tree(tmp_path / "data"), size=4, cache_dir=cache, workers=1, progress=False)
    sub = s.subset(np.array([1, 4]))
    assert sub.labels.tolist() == [0, 1] and sub.images.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(sub.images[1], s.images[4])
    assert sub.key != s.key and sub.key == s.subset([1, 4]).key != s.subset([1, 3]).key
    assert s.subset(s.labels == 1).key == s.select_classes([1]).key
    assert len(s.select_classes([0])) == 3


# --------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    with pytest.raises(EdgeclError) as ei:
        load_imagefolder(tmp_path / "nope", size=8, progress=False)
    _one_line_error(ei, tmp_path / "nope", "--data")


def test_error_no_class_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    _write_image(tmp_path / "flat" / "a.png", (1, 2, 3))
    with pytest.raises(EdgeclError) as ei:
        load_imagefolder(tmp_path / "flat", size=8, progress=False)
    _one_line_error(ei, tmp_path / "flat", "class sub-folders")


def test_error_empty_class_folder(tmp_path, cache):
    root = make_tree(tmp_path / "data")
    (root / "emu").mkdir()
    (root / "emu" / "readme.txt").write_text("no images here")
    with pytest.raises(EdgeclError) as ei:
        load_imagefolder(root, size=8, cache_dir=cache, progress=False)
    _one_line_error(ei, root / "emu", "no images")


@pytest.mark.parametrize("workers", [1, 2])
def test_error_corrupt_image(tmp_path, cache, workers):
    root = make_tree(tmp_path / "data", names=[f"im_{i:02d}.jpg" for i in range(20)])
    bad = root / "dog" / "im_07.jpg"
    bad.write_bytes(b"this is not a jpeg\n" * 10)
    with pytest.raises(EdgeclError) as ei:
        load_imagefolder(root, size=8, cache_dir=cache, workers=workers, progress=False)
    _one_line_error(ei, bad, "cannot decode image", "delete or replace")
    assert not list((cache / "images").iterdir())


def test_error_truncated_jpeg(tmp_path, cache):
    root = make_tree(tmp_path / "data", names=["a.jpg"], size=(64, 64))
    bad = root / "cat" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(EdgeclError) as ei:
        load_imagefolder(root, size=8, cache_dir=cache, workers=1, progress=False)
    _one_line_error(ei, bad)


def test_error_train_val_class_mismatch(tmp_path, cache):
    root = tmp_path / "ds"
    make_tree(root / "train", classes=("cat", "dog", "eel"))
    make_tree(root / "val", classes=("cat", "dog", "fox"))
    cfg = DataConfig(root=str(root), input_size=8, cache_dir=str(cache), workers=1)
    with pytest.raises(EdgeclError) as ei:
        load_dataset(cfg, progress=False)
    _one_line_error(ei, "eel", "fox", "--val-data")


def test_error_layout_without_train_folder(tmp_path, cache):
    root = make_tree(tmp_path / "classes_only")
    cfg = DataConfig(root=str(root), input_size=8, cache_dir=str(cache), workers=1)
    with pytest.raises(EdgeclError) as ei:
        load_dataset(cfg, progress=False)
    _one_line_error(ei, root, "train/", "--val-data")


def test_error_bad_per_class(tmp_path, cache):
    cfg = DataConfig(root=str(tmp_path), train_per_class=0, cache_dir=str(cache))
    with pytest.raises(EdgeclError) as ei:
        load_dataset(cfg, progress=False)
    _one_line_error(ei, "data.train_per_class")


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_layouts(tmp_path, cache):
    root = tmp_path / "ds"
    make_tree(root / "train", names=[f"t{i}.png" for i in range(5)])
    make_tree(root / "val", names=[f"v{i}.png" for i in range(3)])
    cfg = DataConfig(root=str(root), input_size=8, train_per_class=4, val_per_class=2, cache_dir=str(cache), workers=1)
    train, val = load_dataset(cfg, progress=False)
    assert (len(train), len(val)) == (8, 4) and train.class_names == val.class_names == ["cat", "dog"]

    cfg2 = DataConfig(root=str(root / "train"), val_root=str(root / "val"), input_size=8, cache_dir=str(cache),
                      workers=1)
    train2, val2 = load_dataset(cfg2, progress=False)
    assert (len(train2), len(val2)) == (10, 6)


def test_imagenet_r_split_is_seeded_and_disjoint():
    files = [[f"c{c}_{i:03d}.jpg" for i in range(n)] for c, n in enumerate((10, 7, 25))]
    train, test = imagenet_r_split(files)
    assert [len(t) for t in train] == [8, 6, 20] and [len(t) for t in test] == [2, 1, 5]
    for f, tr, te in zip(files, train, test):
        assert sorted(tr + te) == f and tr == sorted(tr)
    assert imagenet_r_split(files) == (train, test)


# --------------------------------------------------------------------------- scenarios


def test_parse_split():
    assert parse_split("B0Inc10") == (0, 10)
    assert parse_split("B50Inc5") == (50, 5)
    assert parse_split("b0 inc10") == (0, 10)
    for bad in ("", "Inc10", "B0Inc0", "B10", "B-1Inc5", "B0Inc10x", None):
        with pytest.raises(EdgeclError) as ei:
            parse_split(bad)
        _one_line_error(ei, "--split")


def test_build_scenario_b0inc10():
    sc = build_scenario(100, "B0Inc10", seed=1993)
    expected = np.random.RandomState(1993).permutation(100).tolist()
    assert sc.class_order == expected
    assert sc.num_sessions == 10 and all(len(s) == 10 for s in sc.sessions)
    assert sum(sc.sessions, []) == expected
    assert build_scenario(100, "B0Inc10", seed=1993) == sc
    assert build_scenario(100, "B0Inc10", seed=1994) != sc

    lm = sc.label_map(100)
    assert lm[expected[0]] == 0 and lm[expected[99]] == 99 and sorted(lm.tolist()) == list(range(100))
    assert sc.seen_classes(1) == expected[:20]
    assert sc.session_of_class(expected[25]) == 2
    assert sc.session_of_label().tolist() == np.repeat(np.arange(10), 10).tolist()
    assert Scenario.from_dict(sc.to_dict()) == sc


def test_build_scenario_base_and_subsets():
    sc = build_scenario(100, "B50Inc10", seed=1993)
    assert [len(s) for s in sc.sessions] == [50, 10, 10, 10, 10, 10]
    sub = build_scenario(200, "B0Inc10", seed=1993, num_classes=100)
    assert sub.class_order == np.random.RandomState(1993).permutation(200)[:100].tolist()
    lm = sub.label_map(200)
    assert (lm == -1).sum() == 100
    assert [len(s) for s in build_scenario(25, "B0Inc10", seed=0).sessions] == [10, 10, 5]
    assert [len(s) for s in build_scenario(10, "B10Inc5", seed=0).sessions] == [10]
    with pytest.raises(EdgeclError) as ei:
        build_scenario(50, "B0Inc10", seed=1, num_classes=100)
    _one_line_error(ei, "data.num_classes")
    with pytest.raises(EdgeclError):
        build_scenario(50, "B60Inc10", seed=1)


# --------------------------------------------------------------------------- batches


def _batch(n=4, h=16, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_and_determinism():
    x = _batch(8, 24, 20)
    out = augment_batch(x, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.permute(0, 3, 1, 2).is_contiguous()
    again = augment_batch(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    other = augment_batch(x, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out, other)
    assert augment_batch(x.float(), generator=torch.Generator().manual_seed(3)).dtype == torch.float32


def test_augment_parts_are_the_augmented_whole_batch():
    """Under torchrun each rank augments its rows of the global batch (edgecl/distributed.py):
    the parts, put together, are the whole batch augmented at once, and the generator moves on
    alike on every rank."""
    x = _batch(7, 20, 24)
    whole_gen = torch.Generator().manual_seed(5)
    whole = augment_batch(x, generator=whole_gen)
    parts = []
    for rows in np.array_split(np.arange(7), 3):
        gen = torch.Generator().manual_seed(5)
        parts.append(augment_batch(x[torch.as_tensor(rows)], generator=gen, batch_size=7, rows=rows))
    part_gen = gen
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(torch.rand(3, generator=whole_gen), torch.rand(3, generator=part_gen))
    with pytest.raises(ValueError, match="rows"):
        augment_batch(x[:2], generator=torch.Generator(), rows=np.arange(2))


def test_augment_identity_and_flip():
    x = _batch()
    same = augment_batch(x, crop_scale=(1.0, 1.0), hflip=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    # flip every image: draw until the flip coin says so is random; instead check the flipped set
    outs = [augment_batch(x, crop_scale=(1.0, 1.0), hflip=True, generator=torch.Generator().manual_seed(s))
            for s in range(6)]
    flipped = x.flip(2)
    for out in outs:
        for i in range(len(x)):
            assert torch.equal(out[i], x[i]) or torch.equal(out[i], flipped[i])
    n_flipped = sum(torch.equal(o[i], flipped[i]) for o in outs for i in range(len(x)))
    assert 0 < n_flipped < 6 * len(x)


def test_augment_crop_zooms_in():
    # a horizontal ramp: a crop of area 1/4 spans about half the columns' range
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8)
    x = ramp.view(1, 1, 64, 1).expand(16, 64, 64, 3).contiguous()
    out = augment_batch(x, crop_scale=(0.25, 0.25), ratio=(1.0, 1.0), hflip=False,
                        generator=torch.Generator().manual_seed(1))
    span = out[:, 0, -1, 0].float() - out[:, 0, 0, 0].float()
    assert torch.allclose(span, torch.full_like(span, 0.5 * 252), atol=8)


def test_iterate_batches():
    batches = list(iterate_batches(10, 4, shuffle=False))
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(b) for b in iterate_batches(10, 4, shuffle=False, drop_last=True)] == [4, 4]
    a = np.concatenate(list(iterate_batches(10, 3, shuffle=True, generator=torch.Generator().manual_seed(5))))
    b = np.concatenate(list(iterate_batches(10, 3, shuffle=True, generator=torch.Generator().manual_seed(5))))
    assert sorted(a.tolist()) == list(range(10)) and a.tolist() == b.tolist() and a.tolist() != list(range(10))
    assert list(iterate_batches(0, 3, shuffle=True)) == []


# --------------------------------------------------------------------------- real data smoke test


def _tiny_imagenet() -> Path:
    env = os.environ.get("EDGECL_TINY_IMAGENET")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny-imagenet-100"


@pytest.mark.skipif(not (_tiny_imagenet() / "train").is_dir(), reason="tiny-imagenet-100 not present")
def test_tiny_imagenet_smoke(tmp_path):
    src = _tiny_imagenet() / "train"
    # a 2-class view of the real tree (symlinked class folders), 5 images each
    view = tmp_path / "view"
    view.mkdir()
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())[:2]
    for c in classes:
        (view / c).symlink_to(src / c, target_is_directory=True)
    s = load_imagefolder(view, size=96, per_class=5, cache_dir=tmp_path / "cache", workers=1, progress=False)
    assert s.images.shape == (10, 96, 96, 3) and s.class_names == classes
    assert s.labels.tolist() == [0] * 5 + [1] * 5
    assert 20 < float(np.asarray(s.images).mean()) < 235


def test_imagenet_r_from_extracted_folder(tmp_path, cache):
    base = tmp_path / "inr" / "imagenet-r"
    make_tree(base, classes=("n01443537", "n01833805"), names=[f"art_{i}.jpg" for i in range(10)])
    cfg = DataConfig(dataset="imagenet-r", root=str(tmp_path / "inr"), input_size=8, cache_dir=str(cache), workers=1)
    train, val = load_dataset(cfg, progress=False)
    assert (len(train), len(val)) == (16, 4) and train.class_names == ["n01443537", "n01833805"]
    assert train.labels.tolist() == [0] * 8 + [1] * 8
