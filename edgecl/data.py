"""Datasets, the decode cache, class-incremental scenarios and batch augmentation.

Images are decoded once (PIL: RGB, shorter side resized to ``size`` with bicubic, centre
crop ``size`` x ``size``) into one uint8 ``[N, S, S, 3]`` array stored as an ``.npy`` file
plus a small JSON sidecar under the cache directory, keyed by a hash of the absolute root,
the relative file list with sizes and mtimes, the size and the format version. Later runs
memory-map the array (read-only), which takes well under a second even for tens of
thousands of images. Cache files are written to a temporary name and moved into place with
``os.replace`` (the ``.npy`` first, the JSON last), so an interrupted write is never trusted.

torch is imported lazily: only :func:`augment_batch`, :func:`iterate_batches` and the
CIFAR-100 path need it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import numpy as np

from .core.errors import EdgeclError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .config import DataConfig

FORMAT_VERSION = 1
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "ppm", "pgm", "tif", "tiff", "webp"})  # any case
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
SPLIT_SEED = 1993  # seed of the ImageNet-R 80/20 train/test split
_STALE_TMP_SECONDS = 3600


def _one_line(exc: BaseException) -> str:
    """An exception as one short line (for error messages)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# --------------------------------------------------------------------------- ImageSet


@dataclass
class ImageSet:
    """Decoded images with their labels.

    ``images`` is uint8 ``[N, S, S, 3]`` RGB (often a read-only ``np.memmap`` from the cache;
    index it with sorted index arrays for sequential reads); ``labels`` is int64 ``[N]``, an
    index into ``class_names``; ``key`` is a stable hash of the content (used to cache features).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    key: str

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"ImageSet: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "ImageSet":
        """The images at ``idx`` (int indices or a boolean mask), copied into memory; the key
        is derived from this set's key and the indices."""
        idx = np.asarray(idx)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        digest = hashlib.sha256(f"{self.key}:subset:".encode() + idx.astype("<i8").tobytes()).hexdigest()
        return ImageSet(np.asarray(self.images[idx]), self.labels[idx], list(self.class_names), digest[:32])

    def relabel(self, class_names: Sequence[str]) -> tuple:
        """``(rows, labels)``: the images whose class name is in ``class_names`` and its index
        there (how a bundle or an engine directory, with its own class order, scores a folder)."""
        index = {name: i for i, name in enumerate(class_names)}
        mapped = np.array([index.get(name, -1) for name in self.class_names], dtype=np.int64)[self.labels]
        rows = np.flatnonzero(mapped >= 0)
        return rows, mapped[rows]

    def select_classes(self, classes: Sequence[int]) -> "ImageSet":
        """The images whose label is in ``classes`` (dataset class indices), in their order here."""
        return self.subset(np.flatnonzero(np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))))


# --------------------------------------------------------------------------- cache files


def default_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The cache root: ``cache_dir``, else ``$EDGECL_CACHE``, else ``~/.cache/edgecl``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDGECL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgecl"


def _images_dir(cache_dir) -> Path:
    path = default_cache_dir(cache_dir) / "images"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeclError(
            f"cannot create the decode cache directory {path}: {_one_line(exc)}; "
            "point data.cache_dir or $EDGECL_CACHE to a writable directory"
        ) from None
    return path


def _cache_lookup(folder: Path, key: str, shape: tuple) -> Optional[tuple]:
    """``(memmap, meta)`` when a complete cache entry for ``key`` with this shape exists."""
    meta_path, npy_path = folder / f"{key}.json", folder / f"{key}.npy"
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != FORMAT_VERSION:
            return None
        arr = np.load(npy_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if arr.dtype != np.uint8 or tuple(arr.shape) != tuple(shape):
        return None
    return arr, meta


def _remove_stale_tmp(folder: Path, key: str) -> None:
    """Delete temporary files of ``key`` left by a killed run (older than an hour)."""
    now = time.time()
    for path in folder.glob(f"{key}.*.tmp*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_SECONDS:
                path.unlink()
        except OSError:
            pass


def _preallocate(path: Path) -> None:
    """Reserve the file's blocks, so a full disk fails here and not as SIGBUS in a memmap write."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "rb+") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


def _cache_build(folder: Path, key: str, shape: tuple, meta: dict,
                 fill: Callable[[Path, np.ndarray], None]) -> np.memmap:
    """Create the cache entry: ``fill(tmp_path, out)`` writes every row of the uint8 ``out``
    memmap; the files are then moved into place atomically. Returns the read-only memmap."""
    _remove_stale_tmp(folder, key)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_npy = folder / f"{key}.{tag}.tmp.npy"
    tmp_meta = folder / f"{key}.{tag}.tmp.json"
    try:
        try:
            out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=tuple(shape))
            _preallocate(tmp_npy)
        except OSError as exc:
            raise EdgeclError(
                f"cannot write the decode cache {tmp_npy}: {_one_line(exc)}; "
                "free disk space or point data.cache_dir / $EDGECL_CACHE elsewhere"
            ) from None
        fill(tmp_npy, out)
        out.flush()
        del out
        with open(tmp_npy, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_npy, folder / f"{key}.npy")
        tmp_meta.write_text(json.dumps({**meta, "key": key, "format": FORMAT_VERSION}))
        os.replace(tmp_meta, folder / f"{key}.json")
    except OSError as exc:
        raise EdgeclError(
            f"cannot write the decode cache in {folder}: {_one_line(exc)}; "
            "free disk space or point data.cache_dir / $EDGECL_CACHE elsewhere"
        ) from None
    finally:
        for path in (tmp_npy, tmp_meta):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
    return np.load(folder / f"{key}.npy", mmap_mode="r")


# --------------------------------------------------------------------------- decoding


def _decode_image(path: str, size: int) -> np.ndarray:
    """One image as uint8 ``[size, size, 3]`` RGB: shorter side to ``size`` (bicubic), centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (2 * size, 2 * size))  # JPEG: decode large images at a reduced scale
        img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, max(size, int(size * h / w))
    else:
        nw, nh = max(size, int(size * w / h)), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


_WORKER: dict = {}


def _worker_init(npy_path: str, size: int) -> None:
    _WORKER["out"] = np.load(npy_path, mmap_mode="r+")
    _WORKER["size"] = size


def _decode_chunk(task: tuple) -> tuple:
    """Worker: decode ``paths`` into rows ``start...`` of the shared output file.
    Returns ``(count, None)`` or ``(count, (path, reason))`` at the first failure."""
    start, paths = task
    out, size = _WORKER["out"], _WORKER["size"]
    for i, path in enumerate(paths):
        try:
            out[start + i] = _decode_image(path, size)
        except Exception as exc:  # noqa: BLE001 - reported to the user with the file name
            return i, (path, _one_line(exc))
    return len(paths), None


def _decode_error(path: str, reason: str) -> EdgeclError:
    reason = reason.replace(f" {path!r}", "").replace(f" {path}", "")  # PIL repeats the path
    return EdgeclError(f"cannot decode image {path}: {reason}; delete or replace it")


def _decode_all(paths: list, npy_path: Path, out: np.ndarray, size: int, workers: int, progress: bool,
                desc: str) -> None:
    """Decode ``paths`` into ``out`` (the memmap stored at ``npy_path``), with a process pool
    of ``workers`` (in-process when ``workers <= 1`` or there are few images)."""
    from tqdm.auto import tqdm

    n = len(paths)
    chunk = int(min(256, max(16, n // (max(1, workers) * 8))))
    workers = min(int(workers), math.ceil(n / chunk))
    if multiprocessing.current_process().daemon:  # daemonic processes may not have children
        workers = 1
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress else True, dynamic_ncols=True)
    try:
        if workers <= 1:
            for i, path in enumerate(paths):
                try:
                    out[i] = _decode_image(path, size)
                except Exception as exc:  # noqa: BLE001
                    raise _decode_error(path, _one_line(exc)) from None
                bar.update(1)
            return
        out.flush()
        tasks = [(s, paths[s:s + chunk]) for s in range(0, n, chunk)]
        # fork: workers only run PIL/numpy, and unlike spawn it needs no __main__ guard in scripts
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
            pool = multiprocessing.get_context(method).Pool(
                workers, initializer=_worker_init, initargs=(str(npy_path), size))
        with pool:
            for count, err in pool.imap_unordered(_decode_chunk, tasks):
                if err is not None:
                    raise _decode_error(*err)
                bar.update(count)
    finally:
        bar.close()


# --------------------------------------------------------------------------- ImageFolder


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


def _list_classes(root: Path, what: str) -> list:
    """Sorted class sub-folder names of ``root`` (hidden folders ignored)."""
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise EdgeclError(f"cannot read data path {root}: {_one_line(exc)} ({what})") from None
    if not names:
        raise EdgeclError(
            f"data path {root} has no class sub-folders ({what}); expected an ImageFolder tree {root}/<class>/<images>"
        )
    return names


def _list_images(class_dir: Path) -> list:
    """Sorted image file names in one class folder (other files ignored)."""
    try:
        return sorted(e.name for e in os.scandir(class_dir) if _is_image(e.name) and e.is_file())
    except OSError as exc:
        raise EdgeclError(f"cannot read class folder {class_dir}: {_one_line(exc)}") from None


def _check_per_class(per_class: Optional[int], what: str) -> None:
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise EdgeclError(f"images per class must be a positive integer or unset, got {per_class!r} ({what})")


def _load_files(root: Path, class_names: list, files: list, *, size: int, cache_dir, workers: int,
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
                raise EdgeclError(f"cannot read image {root}/{rel}: {_one_line(exc)}; delete or replace it") from None
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            rel_paths.append(rel)
        labels += [label] * len(names)
    key = digest.hexdigest()[:32]
    labels = np.asarray(labels, dtype=np.int64)
    shape = (len(rel_paths), size, size, 3)
    folder = _images_dir(cache_dir)
    hit = _cache_lookup(folder, key, shape)
    if hit is not None and hit[1].get("labels") == labels.tolist() and hit[1].get("class_names") == list(class_names):
        return ImageSet(hit[0], labels, list(class_names), key)

    def fill(npy_path: Path, out: np.ndarray) -> None:
        _decode_all([str(root / r) for r in rel_paths], npy_path, out, size, workers, progress,
                    desc=f"decoding {root.name}")

    meta = {"source": "imagefolder", "root": str(root), "size": size, "class_names": list(class_names),
            "labels": labels.tolist(), "files": rel_paths}
    images = _cache_build(folder, key, shape, meta, fill)
    return ImageSet(images, labels, list(class_names), key)


def load_imagefolder(root, *, size: int, per_class: Optional[int] = None, cache_dir=None, workers: int = 2,
                     progress: bool = True, what: str = "--data") -> ImageSet:
    """Load ``root/<class>/<images>`` decoded at ``size`` x ``size``, through the decode cache.

    Classes are the sorted sub-folder names; files are sorted by name per class and only the
    first ``per_class`` are kept (before decoding). Non-image files and hidden entries are
    ignored. ``what`` names the option the path came from, for error messages.
    """
    _check_per_class(per_class, what)
    root = _check_dir(root, what)
    class_names = _list_classes(root, what)
    files = []
    for cname in class_names:
        names = _list_images(root / cname)
        if not names:
            raise EdgeclError(f"class folder {root / cname} has no images; remove it or add images ({what})")
        files.append(names[:per_class] if per_class is not None else names)
    return _load_files(root, class_names, files, size=size, cache_dir=cache_dir, workers=workers, progress=progress)


# --------------------------------------------------------------------------- datasets


def load_dataset(cfg: "DataConfig", *, progress: bool = True) -> tuple:
    """``(train, val)`` ImageSets for ``cfg.dataset`` (imagefolder | cifar100 | imagenet-r)."""
    _check_per_class(cfg.train_per_class, "data.train_per_class")
    _check_per_class(cfg.val_per_class, "data.val_per_class")
    if isinstance(cfg.input_size, bool) or not isinstance(cfg.input_size, int) or cfg.input_size < 1:
        raise EdgeclError(f"data.input_size must be a positive integer, got {cfg.input_size!r}")
    if cfg.dataset == "imagefolder":
        return _load_imagefolder_pair(cfg, progress)
    if cfg.dataset == "cifar100":
        return _load_cifar100(cfg, progress)
    if cfg.dataset == "imagenet-r":
        return _load_imagenet_r(cfg, progress)
    raise EdgeclError(f"unknown dataset {cfg.dataset!r} (data.dataset); choose imagefolder, cifar100 or imagenet-r")


def _load_imagefolder_pair(cfg: "DataConfig", progress: bool) -> tuple:
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
    train_names, val_names = _list_classes(train_dir, "--data"), _list_classes(val_dir, val_what)
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


def _load_cifar100(cfg: "DataConfig", progress: bool) -> tuple:
    """CIFAR-100 via torchvision (downloaded into ``cfg.root``, default ``<cache>/datasets``)."""
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir(cfg.cache_dir) / "datasets"
    base = root / "cifar-100-python"
    if not ((base / "train").is_file() and (base / "test").is_file() and (base / "meta").is_file()):
        try:
            from torchvision.datasets import CIFAR100

            CIFAR100(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network / disk problems, shown as one line
            raise EdgeclError(
                f"cannot download CIFAR-100 into {root} (--data): {_one_line(exc)}; check the network "
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
    folder = _images_dir(cache_dir)
    meta_path = folder / f"{key}.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            hit = _cache_lookup(folder, key, (len(meta["labels"]), size, size, 3))
        except (OSError, ValueError, KeyError, TypeError):
            hit = None
        if hit is not None:
            return ImageSet(hit[0], np.asarray(meta["labels"]), list(meta["class_names"]), key)
    try:
        from torchvision.datasets import CIFAR100

        ds = CIFAR100(str(root), train=train, download=False)
    except Exception as exc:  # noqa: BLE001
        raise EdgeclError(f"cannot read CIFAR-100 {split} data in {root} (--data): {_one_line(exc)}; "
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
    images = _cache_build(folder, key, (len(data), size, size, 3), meta, fill)
    return ImageSet(images, labels, list(ds.classes), key)


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
        raise EdgeclError(f"cannot download ImageNet-R into {root} (--data): {_one_line(exc)}; "
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


def _load_imagenet_r(cfg: "DataConfig", progress: bool) -> tuple:
    root = Path(cfg.root).expanduser() if cfg.root else default_cache_dir(cfg.cache_dir) / "datasets"
    base = _imagenet_r_dir(root)
    class_names = _list_classes(base, "--data")
    files = []
    for cname in class_names:
        names = _list_images(base / cname)
        if not names:
            raise EdgeclError(f"class folder {base / cname} has no images; remove it or add images (--data)")
        files.append(names)
    train_files, test_files = imagenet_r_split(files)
    common = dict(size=cfg.input_size, cache_dir=cfg.cache_dir, workers=cfg.workers, progress=progress)
    cut = lambda lists, n: [f[:n] for f in lists] if n is not None else lists  # noqa: E731
    train = _load_files(base, class_names, cut(train_files, cfg.train_per_class), **common)
    val = _load_files(base, class_names, cut(test_files, cfg.val_per_class), **common)
    return train, val


# --------------------------------------------------------------------------- scenarios

_SPLIT_RE = re.compile(r"^\s*B(\d+)[\s_-]*Inc(\d+)\s*$", re.IGNORECASE)


def parse_split(split: str) -> tuple:
    """``"B0Inc10"`` -> ``(0, 10)``: base-session classes, then new classes per session."""
    m = _SPLIT_RE.match(split) if isinstance(split, str) else None
    if not m or int(m.group(2)) < 1:
        raise EdgeclError(f"bad split {split!r} (--split / data.split): expected B<base>Inc<K> with K >= 1, "
                          "for example B0Inc10 or B50Inc10")
    return int(m.group(1)), int(m.group(2))


@dataclass
class Scenario:
    """A class-incremental protocol over dataset class indices.

    ``class_order`` lists the used dataset classes in incremental order; ``sessions`` cuts it
    into consecutive sessions. The incremental label of a class is its position in ``class_order``.
    """

    class_order: list
    sessions: list

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_sessions(self) -> int:
        return len(self.sessions)

    def label_map(self, n_dataset_classes: int) -> np.ndarray:
        """int64 ``[n_dataset_classes]``: dataset label -> incremental label, -1 if unused."""
        out = np.full(n_dataset_classes, -1, dtype=np.int64)
        out[np.asarray(self.class_order, dtype=np.int64)] = np.arange(len(self.class_order))
        return out

    def seen_classes(self, t: int) -> list:
        """Dataset classes of sessions ``0..t``."""
        return [c for s in self.sessions[: t + 1] for c in s]

    def session_of_class(self, c: int) -> int:
        """The session that introduces dataset class ``c`` (ValueError when unused)."""
        for t, s in enumerate(self.sessions):
            if c in s:
                return t
        raise ValueError(f"class {c} is not in this scenario")

    def session_of_label(self) -> np.ndarray:
        """int64 ``[num_classes]``: incremental label -> its session."""
        return np.concatenate([np.full(len(s), t, dtype=np.int64) for t, s in enumerate(self.sessions)])

    def to_dict(self) -> dict:
        return {"class_order": list(self.class_order), "sessions": [list(s) for s in self.sessions]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scenario":
        return cls([int(c) for c in d["class_order"]], [[int(c) for c in s] for s in d["sessions"]])


def build_scenario(n_classes: int, split: str, seed: int, num_classes: Optional[int] = None) -> Scenario:
    """Seeded class order (``np.random.RandomState(seed).permutation(n_classes)``, first
    ``num_classes`` kept) cut by ``split``. When the classes do not divide evenly the last
    session is smaller."""
    base, inc = parse_split(split)
    if n_classes < 1:
        raise EdgeclError("the dataset has no classes")
    if num_classes is None:
        num_classes = n_classes
    if num_classes < 1 or num_classes > n_classes:
        raise EdgeclError(f"data.num_classes={num_classes} but the dataset has {n_classes} classes; "
                          f"use a value from 1 to {n_classes}")
    if base > num_classes:
        raise EdgeclError(f"split {split!r} (--split / data.split) puts {base} classes in the base session "
                          f"but only {num_classes} classes are used; lower B or raise data.num_classes")
    order = [int(c) for c in np.random.RandomState(seed).permutation(n_classes)[:num_classes]]
    cuts = ([base] if base > 0 else []) + list(range(base + inc, num_classes, inc)) + [num_classes]
    sessions, start = [], 0
    for end in cuts:
        if end > start:
            sessions.append(order[start:end])
            start = end
    return Scenario(order, sessions)


# --------------------------------------------------------------------------- batches


def augment_batch(x: "torch.Tensor", *, crop_scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                  generator: Optional["torch.Generator"] = None) -> "torch.Tensor":
    """Random-resized-crop (area fraction in ``crop_scale``, aspect ratio in ``ratio``) and a
    random horizontal flip for a whole NHWC batch: one affine sampling grid and one bilinear
    ``grid_sample`` call, no per-image loop. Output has the input's NHWC shape, dtype (uint8 in -> rounded uint8 out)
    and device; it is a channels-last view (``out.permute(0, 3, 1, 2)`` is contiguous NCHW, which
    is what :class:`~edgecl.backbones.Normalize` makes of it), so call ``.contiguous()`` before
    ``.view()``.

    Crop sizes follow torchvision's ``RandomResizedCrop``: up to 10 draws per image, then the
    whole image (ratio-clamped) as fallback. Random numbers come from ``generator`` (CPU).
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"augment_batch expects an NHWC batch, got shape {tuple(x.shape)}")
    n, h, w, _c = x.shape
    if n == 0:
        return x.clone()
    tries = 10
    u = torch.rand(2 * tries + 3, n, generator=generator, dtype=torch.float64)
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = (lo + (hi - lo) * u[:tries]) * (h * w)
    r = torch.exp(log_lo + (log_hi - log_lo) * u[tries:2 * tries])
    cw, ch = torch.sqrt(area * r), torch.sqrt(area / r)
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = ok.to(torch.int64).argmax(0, keepdim=True)
    cw, ch = cw.gather(0, first)[0], ch.gather(0, first)[0]
    in_ratio = w / h
    fb_w, fb_h = (w, w / ratio[0]) if in_ratio < ratio[0] else ((h * ratio[1], h) if in_ratio > ratio[1] else (w, h))
    any_ok = ok.any(0)
    sx = torch.where(any_ok, cw, torch.full_like(cw, fb_w)) / w
    sy = torch.where(any_ok, ch, torch.full_like(ch, fb_h)) / h
    tx = (2 * u[2 * tries] - 1) * (1 - sx)
    ty = (2 * u[2 * tries + 1] - 1) * (1 - sy)
    if hflip:
        sx = torch.where(u[2 * tries + 2] < 0.5, -sx, sx)
    # The affine_grid of theta = [[sx, 0, tx], [0, sy, ty]] (align_corners=False), built
    # separably: the same grid, several times cheaper than F.affine_grid's batched matmul on CPU.
    base_x = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    base_y = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    gx = (sx[:, None] * base_x + tx[:, None]).float().to(x.device)
    gy = (sy[:, None] * base_y + ty[:, None]).float().to(x.device)
    grid = torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)
    xf = x.permute(0, 3, 1, 2).float()
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if x.dtype == torch.uint8:
        out = out.add_(0.5).clamp_(0, 255).to(torch.uint8)  # round half up (values are >= 0)
    else:
        out = out.to(x.dtype)
    return out.permute(0, 2, 3, 1)


def iterate_batches(n: int, batch_size: int, *, shuffle: bool, generator: Optional["torch.Generator"] = None,
                    drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering ``range(n)`` in batches (a seeded shuffle when
    ``shuffle``; the order comes from ``torch.randperm(n, generator=generator)``)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    order = order.astype(np.int64, copy=False)
    stop = (n // batch_size) * batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        yield order[s:s + batch_size]
