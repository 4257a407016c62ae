"""ImageFolder data: ``DIR/<class>/<images>`` listed, decoded through the cache, and paired
into train and val.

Classes are the sorted sub-folder names (hidden folders ignored); images are the files with an
image extension (any case), sorted by name per class. :func:`load_files` decodes a listing
through the decode cache (:mod:`.cache`, :mod:`.decode`); :func:`load_imagefolder` loads one
folder; :func:`load_imagefolder_pair` loads the train and val folders of ``data.dataset:
imagefolder`` and refuses, before any decoding, val classes that differ from train's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..core.errors import EdgeclError, one_line
from ..core.labels import check_label, shown
from .cache import FORMAT_VERSION, cache_build, cache_lookup, images_dir
from .decode import decode_files
from .imageset import ImageSet

if TYPE_CHECKING:  # pragma: no cover
    from ..config import DataConfig

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "ppm", "pgm", "tif", "tiff", "webp"})  # any case


# --------------------------------------------------------------------------- listing


def _check_dir(root, what: str) -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        raise EdgeclError(f"data path {path} does not exist ({what})")
    if not path.is_dir():
        raise EdgeclError(f"data path {path} is not a directory ({what}); "
                          "give an ImageFolder root: DIR/<class>/<images>")
    return path


def _is_image(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(stem) and dot == "." and name[0] != "." and ext.lower() in IMAGE_EXTENSIONS


def list_classes(root: Path, what: str) -> list:
    """Sorted class sub-folder names of ``root`` (hidden folders ignored)."""
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise EdgeclError(f"cannot read data path {shown(root)}: {one_line(exc)} ({what})") from None
    for name in names:  # class names are labels: printable text (edgecl.core.labels)
        check_label(name, f"class folder {shown(Path(root) / name)} ({what})")
    if not names:
        raise EdgeclError(
            f"data path {root} has no class sub-folders ({what}); expected an ImageFolder tree {root}/<class>/<images>"
        )
    return names


def list_images(class_dir: Path) -> list:
    """Sorted image file names in one class folder (other files ignored)."""
    try:
        return sorted(e.name for e in os.scandir(class_dir) if _is_image(e.name) and e.is_file())
    except OSError as exc:
        raise EdgeclError(f"cannot read class folder {class_dir}: {one_line(exc)}") from None


def check_per_class(per_class: Optional[int], what: str) -> None:
    """Refuse an images-per-class limit that is not a positive integer or None."""
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise EdgeclError(f"images per class must be a positive integer or unset, got {per_class!r} ({what})")


# --------------------------------------------------------------------------- loading


def load_files(root: Path, class_names: list, files: list, *, size: int, cache_dir, workers: int,
               progress: bool) -> ImageSet:
    """Decode (or load from the cache) ``files[c]`` (names inside ``root/class_names[c]``)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise EdgeclError(f"input size must be a positive integer, got {size!r} (data.input_size)")
    root = root.resolve()
    digest = hashlib.sha256(json.dumps(["imagefolder", FORMAT_VERSION, str(root), size]).encode())
    rel_paths, labels = [], []
    for label, (cname, names) in enumerate(zip(class_names, files)):
        for name in names:
            rel = f"{cname}/{name}"
            try:
                st = os.stat(f"{root}/{rel}")
            except OSError as exc:
                raise EdgeclError(f"cannot read image {shown(root / rel)}: {one_line(exc)}; delete or replace "
                                  f"it") from None
            # file-system bytes: a name that is not valid UTF-8 hashes as it is (UTF-8 names as before)
            digest.update(os.fsencode(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            rel_paths.append(rel)
        labels += [label] * len(names)
    key = digest.hexdigest()[:32]
    labels = np.asarray(labels, dtype=np.int64)
    shape = (len(rel_paths), size, size, 3)
    folder = images_dir(cache_dir)
    hit = cache_lookup(folder, key, shape)
    if hit is not None and hit[1].get("labels") == labels.tolist() and hit[1].get("class_names") == list(class_names):
        return ImageSet(hit[0], labels, list(class_names), key)

    def fill(npy_path: Path, out: np.ndarray) -> None:
        decode_files([str(root / r) for r in rel_paths], npy_path, out, size, workers, progress,
                     desc=f"decoding {root.name}")

    meta = {"source": "imagefolder", "root": str(root), "size": size, "class_names": list(class_names),
            "labels": labels.tolist(), "files": rel_paths}
    images = cache_build(folder, key, shape, meta, fill)
    return ImageSet(images, labels, list(class_names), key)


def load_imagefolder(root, *, size: int, per_class: Optional[int] = None, cache_dir=None, workers: int = 2,
                     progress: bool = True, what: str = "--data") -> ImageSet:
    """Load ``root/<class>/<images>`` decoded at ``size`` x ``size``, through the decode cache.

    Classes are the sorted sub-folder names; files are sorted by name per class and only the
    first ``per_class`` are kept (before decoding). Non-image files and hidden entries are
    ignored. ``what`` names the option the path came from, for error messages.
    """
    check_per_class(per_class, what)
    root = _check_dir(root, what)
    class_names = list_classes(root, what)
    files = []
    for cname in class_names:
        names = list_images(root / cname)
        if not names:
            raise EdgeclError(f"class folder {root / cname} has no images; remove it or add images ({what})")
        files.append(names[:per_class] if per_class is not None else names)
    return load_files(root, class_names, files, size=size, cache_dir=cache_dir, workers=workers, progress=progress)


# --------------------------------------------------------------------------- train / val


def load_imagefolder_pair(cfg: "DataConfig", progress: bool) -> tuple:
    """``(train, val)`` of ``data.dataset: imagefolder``: ``--data`` with train/ and val/
    sub-folders, or ``--data`` (train) and ``--val-data`` (val)."""
    if not cfg.root:
        raise EdgeclError("no training data given; pass --data DIR (an ImageFolder root with train/ and val/)")
    root = _check_dir(cfg.root, "--data")
    common = dict(size=cfg.input_size, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=progress)
    if cfg.val_root:
        train_dir, val_dir, val_what = root, _check_dir(cfg.val_root, "--val-data"), "--val-data"
    elif (root / "train").is_dir():
        train_dir, val_dir, val_what = root / "train", root / "val", "--data"
        if not val_dir.is_dir():
            raise EdgeclError(f"data path {root} has train/ but no val/ sub-folder; "
                              f"add {val_dir} or pass --val-data DIR")
    else:
        raise EdgeclError(
            f"data path {root} has no train/ sub-folder (--data); give either a root with train/<class>/ and "
            "val/<class>/ folders, or a train ImageFolder with --data and a val ImageFolder with --val-data"
        )
    train_names, val_names = list_classes(train_dir, "--data"), list_classes(val_dir, val_what)
    if train_names != val_names:  # checked before any decoding
        _raise_class_mismatch(train_names, val_names, train_dir, val_dir)
    train = load_imagefolder(train_dir, per_class=cfg.train_per_class, what="--data", **common)
    val = load_imagefolder(val_dir, per_class=cfg.val_per_class, what=val_what, **common)
    return train, val


def _raise_class_mismatch(train_names: list, val_names: list, train_dir: Path, val_dir: Path) -> None:
    def few(names):
        names = sorted(names)
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    missing, extra = set(train_names) - set(val_names), set(val_names) - set(train_names)
    parts = (([f"missing in val: {few(missing)}"] if missing else [])
             + ([f"not in train: {few(extra)}"] if extra else []))
    raise EdgeclError(
        f"val classes in {val_dir} differ from train classes in {train_dir} ({'; '.join(parts)}); "
        "the val folder (--val-data, or val/ under --data) must have the same class folders as train"
    )
