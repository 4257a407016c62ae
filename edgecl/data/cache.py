"""The uint8 decode cache.

Images are decoded once (:mod:`.decode`) into one uint8 ``[N, S, S, 3]`` array stored as an
``.npy`` file plus a small JSON sidecar under the cache directory, keyed by a hash of the
absolute root, the relative file list with sizes and mtimes, the size and the format version
(the loaders in :mod:`.imagefolder` and :mod:`.benchmarks` compute the key). Later runs
memory-map the array (read-only), which takes well under a second even for tens of thousands
of images. Cache files are written durably (:mod:`edgecl.core.durable`: a fresh temporary
file, fsynced and renamed into place; the ``.npy`` first, the JSON last), so an interrupted
write is never trusted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from ..core.durable import atomic_path, remove_stale_tmp, write_json_durable
from ..core.errors import EdgeclError, one_line

FORMAT_VERSION = 1


def default_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The cache root: ``cache_dir``, else ``$EDGECL_CACHE``, else ``~/.cache/edgecl``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("EDGECL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgecl"


@contextlib.contextmanager
def cache_lock(cache_dir, enabled: bool = True) -> Iterator[None]:
    """Hold the cache root's lock file (``flock``) for the block: the processes of a torchrun run
    load their data one after the other, so the first decodes into the cache and the others read
    it, and no image is decoded twice (before the process group exists: forking a decode pool
    after the collectives' threads have started can deadlock). A no-op where ``flock`` is missing."""
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    root = images_dir(cache_dir).parent
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def images_dir(cache_dir) -> Path:
    """The folder of decoded image arrays under the cache root (created when missing)."""
    path = default_cache_dir(cache_dir) / "images"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeclError(
            f"cannot create the decode cache directory {path}: {one_line(exc)}; "
            "point data.cache_dir or $EDGECL_CACHE to a writable directory"
        ) from None
    return path


def cache_lookup(folder: Path, key: str, shape: tuple) -> Optional[tuple]:
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


def cache_build(folder: Path, key: str, shape: tuple, meta: dict,
                fill: Callable[[Path, np.ndarray], None]) -> np.memmap:
    """Create the cache entry: ``fill(tmp_path, out)`` writes every row of the uint8 ``out``
    memmap; the files are then moved into place atomically (:mod:`edgecl.core.durable`: the
    ``.npy`` first, the JSON last). Returns the read-only memmap."""
    remove_stale_tmp(folder)
    try:
        with atomic_path(folder / f"{key}.npy") as tmp_npy:
            try:
                out = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=tuple(shape))
                _preallocate(tmp_npy)
            except OSError as exc:
                raise EdgeclError(
                    f"cannot write the decode cache {tmp_npy}: {one_line(exc)}; "
                    "free disk space or point data.cache_dir / $EDGECL_CACHE elsewhere"
                ) from None
            fill(tmp_npy, out)
            out.flush()
            del out
        write_json_durable(folder / f"{key}.json", {**meta, "key": key, "format": FORMAT_VERSION}, indent=None)
    except OSError as exc:
        raise EdgeclError(
            f"cannot write the decode cache in {folder}: {one_line(exc)}; "
            "free disk space or point data.cache_dir / $EDGECL_CACHE elsewhere"
        ) from None
    return np.load(folder / f"{key}.npy", mmap_mode="r")
