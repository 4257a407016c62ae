"""Decoding images: the one decode path of the trainer, the exporter's calibration data and
the device's evaluation.

One image is decoded with PIL: RGB, shorter side resized to ``size`` with bicubic, centre crop
``size`` x ``size``, uint8. A file list is decoded into the rows of a memory-mapped output
array (the decode cache's temporary file, :mod:`.cache`) by a process pool, or in-process for
one worker. Standard library, numpy and Pillow only (no torch).
"""

from __future__ import annotations

import math
import multiprocessing
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import EdgeclError, one_line


def decode_image(path: str, size: int) -> np.ndarray:
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
            out[start + i] = decode_image(path, size)
        except Exception as exc:  # noqa: BLE001 - reported to the user with the file name
            return i, (path, one_line(exc))
    return len(paths), None


def _decode_error(path: str, reason: str) -> EdgeclError:
    reason = reason.replace(f" {path!r}", "").replace(f" {path}", "")  # PIL repeats the path
    return EdgeclError(f"cannot decode image {path}: {reason}; delete or replace it")


def decode_files(paths: list, npy_path: Path, out: np.ndarray, size: int, workers: int, progress: bool,
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
                    out[i] = decode_image(path, size)
                except Exception as exc:  # noqa: BLE001
                    raise _decode_error(path, one_line(exc)) from None
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
