"""Datasets by name: ``data.dataset`` -> ``(train, val)`` ImageSets, through one table.

:data:`DATASETS` maps each name to a loader ``(cfg, progress) -> (train, val)``:

- ``imagefolder``: ``--data`` (and ``--val-data``) as ImageFolders (:mod:`.imagefolder`);
- ``cifar100``: CIFAR-100 via torchvision (downloaded into ``data.root``, default
  ``<cache>/datasets``), its 32 px images resized with torch's bicubic interpolation into the
  decode cache (torch is imported only here, inside the loader);
- ``imagenet-r``: ImageNet-R (downloaded likewise), split 80/20 per class into train and test
  with a seeded permutation (:func:`imagenet_r_split`), decoded like an ImageFolder.

Adding a dataset is one loader function and one entry in :data:`DATASETS`;
:func:`load_dataset` checks the shared options and dispatches.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ..core.errors import EdgeclError, one_line
from .cache import FORMAT_VERSION, cache_build, cache_lookup, default_cache_dir, images_dir
from .imagefolder import check_per_class, list_classes, list_images, load_files, load_imagefolder_pair
from .imageset import ImageSet

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
SPLIT_SEED = 1993  # seed of the ImageNet-R 80/20 train/test split


# --------------------------------------------------------------------------- CIFAR-100


def load_cifar100(cfg: "DataConfig", progress: bool) -> tuple:
    """CIFAR-100 via torchvision (downloaded into ``cfg.root``, default ``<cache>/datasets``)."""
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir(cfg.cache_dir) / "datasets"
    base = root / "cifar-100-python"
    if not ((base / "train").is_file() and (base / "test").is_file() and (base / "meta").is_file()):
        try:
            from torchvision.datasets import CIFAR100

            CIFAR100(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network / disk problems, shown as one line
            raise EdgeclError(
                f"cannot download CIFAR-100 into {root} (--data): {one_line(exc)}; check the network "
                "or put the extracted cifar-100-python/ folder there"
            ) from None
    return tuple(_cifar_split(root, train, cfg.input_size, per, cfg.cache_dir, progress)
                 for train, per in ((True, cfg.train_per_class), (False, cfg.val_per_class)))


def _first_per_class(labels: np.ndarray, per_class: Optional[int]) -> np.ndarray:
    """Indices keeping the first ``per_class`` items of each label, in their original order."""
    if per_class is None:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


def _cifar_split(root: Path, train: bool, size: int, per_class: Optional[int], cache_dir, progress: bool) -> ImageSet:
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    split = "train" if train else "test"
    src = (root / "cifar-100-python" / split).resolve()
    st = src.stat()
    key = hashlib.sha256(json.dumps(
        ["cifar100", FORMAT_VERSION, str(src), st.st_size, st.st_mtime_ns, size, per_class]).encode()).hexdigest()[:32]
    folder = images_dir(cache_dir)
    meta_path = folder / f"{key}.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            hit = cache_lookup(folder, key, (len(meta["labels"]), size, size, 3))
        except (OSError, ValueError, KeyError, TypeError):
            hit = None
        if hit is not None:
            return ImageSet(hit[0], np.asarray(meta["labels"]), list(meta["class_names"]), key)
    try:
        from torchvision.datasets import CIFAR100

        ds = CIFAR100(str(root), train=train, download=False)
    except Exception as exc:  # noqa: BLE001
        raise EdgeclError(f"cannot read CIFAR-100 {split} data in {root} (--data): {one_line(exc)}; "
                          "delete the cifar-100-python folder to download it again") from None
    labels_all = np.asarray(ds.targets, dtype=np.int64)
    keep = _first_per_class(labels_all, per_class)
    data, labels = ds.data[keep], labels_all[keep]

    def fill(_npy_path: Path, out: np.ndarray) -> None:
        step = 500
        for s in tqdm(range(0, len(data), step), desc=f"resizing cifar100 {split}", disable=None if progress else True):
            x = torch.from_numpy(data[s:s + step]).permute(0, 3, 1, 2).float()
            if x.shape[-1] != size:
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                                  antialias=size < x.shape[-1])
            out[s:s + step] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()

    meta = {"source": "cifar100", "root": str(root), "size": size, "class_names": list(ds.classes),
            "labels": labels.tolist()}
    images = cache_build(folder, key, (len(data), size, size, 3), meta, fill)
    return ImageSet(images, labels, list(ds.classes), key)


# --------------------------------------------------------------------------- ImageNet-R


def _imagenet_r_dir(root: Path) -> Path:
    """The folder holding ImageNet-R's wnid class folders, downloading the archive if needed."""

    def has_wnids(path: Path) -> bool:
        return path.is_dir() and any(re.fullmatch(r"n\d{8}", p.name) and p.is_dir() for p in path.iterdir())

    for cand in (root / "imagenet-r", root):
        if has_wnids(cand):
            return cand
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(IMAGENET_R_URL, download_root=str(root), extract_root=str(root))
    except Exception as exc:  # noqa: BLE001
        raise EdgeclError(f"cannot download ImageNet-R into {root} (--data): {one_line(exc)}; "
                          f"download {IMAGENET_R_URL} and extract it there by hand") from None
    if not has_wnids(root / "imagenet-r"):
        raise EdgeclError(f"the ImageNet-R archive extracted into {root} has no imagenet-r/<wnid>/ folders; "
                          "delete it and download again")
    return root / "imagenet-r"


def imagenet_r_split(files: list, seed: int = SPLIT_SEED, train_fraction: float = 0.8) -> tuple:
    """Per-class seeded train/test split of name-sorted file lists: one
    ``np.random.RandomState(seed)`` draws a permutation per class (in class order); the first
    ``round(0.8 n)`` go to train. Both halves come back sorted by file name."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for names in files:
        perm = rng.permutation(len(names))
        n_train = int(round(train_fraction * len(names)))
        train.append(sorted(names[i] for i in perm[:n_train]))
        test.append(sorted(names[i] for i in perm[n_train:]))
    return train, test


def load_imagenet_r(cfg: "DataConfig", progress: bool) -> tuple:
    """ImageNet-R (downloaded into ``cfg.root``, default ``<cache>/datasets``), split by
    :func:`imagenet_r_split`; the per-class limits cut each half's name-sorted list."""
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir(cfg.cache_dir) / "datasets"
    base = _imagenet_r_dir(root)
    class_names = list_classes(base, "--data")
    files = []
    for cname in class_names:
        names = list_images(base / cname)
        if not names:
            raise EdgeclError(f"class folder {base / cname} has no images; remove it or add images (--data)")
        files.append(names)
    train_files, test_files = imagenet_r_split(files)
    common = dict(size=cfg.input_size, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=progress)
    cut = lambda lists, n: [f[:n] for f in lists] if n is not None else lists  # noqa: E731
    train = load_files(base, class_names, cut(train_files, cfg.train_per_class), **common)
    val = load_files(base, class_names, cut(test_files, cfg.val_per_class), **common)
    return train, val


# --------------------------------------------------------------------------- the table


DATASETS: dict[str, Callable[[DataConfig, bool], tuple]] = {
    "imagefolder": load_imagefolder_pair,
    "cifar100": load_cifar100,
    "imagenet-r": load_imagenet_r,
}


def load_dataset(cfg: "DataConfig", *, progress: bool = True) -> tuple:
    """``(train, val)`` ImageSets for ``cfg.dataset`` (a name in :data:`DATASETS`)."""
    check_per_class(cfg.train_per_class, "data.train_per_class")
    check_per_class(cfg.val_per_class, "data.val_per_class")
    if isinstance(cfg.input_size, bool) or not isinstance(cfg.input_size, int) or cfg.input_size < 1:
        raise EdgeclError(f"data.input_size must be a positive integer, got {cfg.input_size!r}")
    loader = DATASETS.get(cfg.dataset) if isinstance(cfg.dataset, str) else None
    if loader is None:
        names = list(DATASETS)
        raise EdgeclError(f"unknown dataset {cfg.dataset!r} (data.dataset); "
                          f"choose {', '.join(names[:-1])} or {names[-1]}")
    return loader(cfg, progress)
