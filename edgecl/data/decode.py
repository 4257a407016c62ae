"""Decoding images: the one decode path of the trainer, the exporter's calibration data and
the device (``edgecl eval``, and every image file ``edgecl run`` and ``edgecl enroll`` read).

The same file gives the same pixels everywhere, and a broken file the same refusal:
:func:`read_image` decodes with PIL to uint8 RGB, applying the EXIF orientation, scaling 16-bit
images to 8 bits (the high byte, as OpenCV does), and refusing a truncated or unreadable file
and one smaller than 2 x 2 pixels with an :class:`~edgecl.core.errors.EdgeclError` naming the
file. :func:`decode_image` then resizes: shorter side to ``size`` with bicubic, centre crop
``size`` x ``size``. Paths are opened by Python (a file name that is not valid UTF-8 works and
is shown with ``\\xNN`` escapes). A file list is decoded into the rows of a memory-mapped output
array (the decode cache's temporary file, :mod:`.cache`) by a process pool, or in-process for
one worker. Standard library, numpy and Pillow only (no torch).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import EdgeclError, one_line
from ..core.labels import shown

MIN_SIDE = 2  # pixels: anything smaller is not an image (the device's frames follow the same rule)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _to_rgb(img):
    """PIL image -> RGB; 16-bit (and 32-bit integer) grey to 8 bits by the high byte."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.int64)
        img = Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def read_image(path, draft: Optional[int] = None):
    """The file at ``path`` as an RGB PIL image, EXIF orientation applied; ``draft``: a JPEG may be
    decoded at a reduced scale that keeps both sides >= ``draft`` (speed only). Refuses a broken
    file with one line naming it."""
    from PIL import Image, ImageFile, ImageOps

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is refused, never padded with grey
    try:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", (draft, draft))
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except EdgeclError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL's errors, reported with the file name
        raise decode_error(path, one_line(exc)) from None
    if min(rgb.size) < MIN_SIDE:
        raise decode_error(path, f"{rgb.size[0]}x{rgb.size[1]} pixels is too small to be an image")
    return rgb


def decode_image(path, size: Optional[int] = None) -> np.ndarray:
    """One image as uint8 RGB: ``[size, size, 3]`` (shorter side to ``size``, bicubic, centre crop),
    or at its own size when ``size`` is None."""
    from PIL import Image

    img = read_image(path, draft=2 * size if size else None)
    if size is None:
        return np.asarray(img, dtype=np.uint8)
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


def _decode_one(path, size: int) -> np.ndarray:
    """:func:`decode_image`, any failure as the one-line error naming the file."""
    try:
        return decode_image(path, size)
    except EdgeclError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported to the user with the file name
        raise decode_error(path, one_line(exc)) from None


def _decode_chunk(task: tuple) -> tuple:
    """Worker: decode ``paths`` into rows ``start...`` of the shared output file.
    Returns ``(count, None)`` or ``(count, message)`` at the first failure."""
    start, paths = task
    out, size = _WORKER["out"], _WORKER["size"]
    for i, path in enumerate(paths):
        try:
            out[start + i] = _decode_one(path, size)
        except EdgeclError as exc:
            return i, str(exc)
    return len(paths), None


def decode_error(path, reason: str) -> EdgeclError:
    path = str(path)
    reason = reason.replace(f" {path!r}", "").replace(f" {path}", "")  # PIL repeats the path
    return EdgeclError(f"cannot decode image {shown(path)}: {shown(reason)}; delete or replace it")


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
                out[i] = _decode_one(path, size)
                bar.update(1)
            return
        out.flush()
        tasks = [(s, paths[s:s + chunk]) for s in range(0, n, chunk)]
        left = _decode_in_pool(tasks, npy_path, size, workers, bar)
        for start, part in left:  # a worker died (killed, out of memory): its chunks, here
            for i, path in enumerate(part):
                out[start + i] = _decode_one(path, size)
                bar.update(1)
    finally:
        bar.close()


def _decode_in_pool(tasks: list, npy_path: Path, size: int, workers: int, bar) -> list:
    """Decode ``tasks`` in a process pool; returns the tasks it could not finish because a worker
    died. A pool whose worker dies is broken, not hung: ``concurrent.futures`` notices the dead
    process (``multiprocessing.Pool`` waits forever for its result)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    # fork: workers only run PIL/numpy, and unlike spawn it needs no __main__ guard in scripts
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    done: set = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork of a threaded process
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_worker_init, initargs=(str(npy_path), size))
    try:
        # The forked workers must never run the destructor of an object they inherited: freeing, say, a
        # dead ONNX Runtime session destroys condition variables its thread pool (threads that do not
        # exist in the child) waits on, and the worker hangs for good (CI saw it). So the parent collects
        # its garbage first and freezes what is left out of the collector's reach while the workers
        # fork (with fork they start at the first submit); the children keep it frozen.
        gc.collect()
        gc.freeze()
        try:
            futures = {pool.submit(_decode_chunk, t): i for i, t in enumerate(tasks)}
        finally:
            gc.unfreeze()
        for fut in as_completed(futures):
            count, err = fut.result()
            if err is not None:
                raise EdgeclError(err)
            done.add(futures[fut])
            bar.update(count)
    except BrokenProcessPool:
        pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [t for i, t in enumerate(tasks) if i not in done]
