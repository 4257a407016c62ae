"""Datasets, the decode cache, class-incremental scenarios and batch augmentation.

- :mod:`.imageset`: :class:`ImageSet`, decoded uint8 images with labels, class names and a key;
- :mod:`.cache`: the uint8 decode cache (``.npy`` + JSON sidecar, atomic writes, memory-mapped reads);
- :mod:`.decode`: the one decode path (PIL: RGB, shorter side to ``size`` bicubic, centre crop)
  and the parallel decode of a file list;
- :mod:`.imagefolder`: ImageFolder listing and loading, and the train/val pairing;
- :mod:`.benchmarks`: datasets by name (``imagefolder``, ``cifar100``, ``imagenet-r``) behind
  one table, :func:`load_dataset`;
- :mod:`.scenario`: the ``B{base}Inc{K}`` split and the seeded class order cut into sessions;
- :mod:`.augment`: index batches and whole-batch augmentation (torch).

Importing this package does not import torch: only :func:`augment_batch`,
:func:`iterate_batches` and the CIFAR-100 loader import it, inside the functions.
"""

from .augment import augment_batch, iterate_batches
from .benchmarks import DATASETS, IMAGENET_R_URL, SPLIT_SEED, imagenet_r_split, load_dataset
from .cache import FORMAT_VERSION, cache_lock, default_cache_dir
from .decode import decode_image
from .imagefolder import IMAGE_EXTENSIONS, list_classes, list_images, load_imagefolder
from .imageset import ImageSet
from .scenario import Scenario, build_scenario, parse_split

__all__ = [
    "DATASETS",
    "FORMAT_VERSION",
    "IMAGENET_R_URL",
    "IMAGE_EXTENSIONS",
    "SPLIT_SEED",
    "ImageSet",
    "Scenario",
    "augment_batch",
    "build_scenario",
    "decode_image",
    "cache_lock",
    "default_cache_dir",
    "imagenet_r_split",
    "iterate_batches",
    "list_classes",
    "list_images",
    "load_dataset",
    "load_imagefolder",
    "parse_split",
]
