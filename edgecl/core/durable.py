"""Durable, atomic writes: the one scheme every artifact uses (bundles, engine directories, the
device store, the decode cache, calibration caches).

- A file is written to a fresh temporary file beside its target, created with
  ``tempfile.mkstemp`` (``O_CREAT | O_EXCL``, and ``O_NOFOLLOW`` where the platform has it: never
  an existing file, never through a planted symlink), fsynced, renamed over the target with
  ``os.replace`` and the directory fsynced: a crash leaves the old file or the new one
  (:func:`atomic_path`, :func:`atomic_file`, :func:`write_bytes_durable`, :func:`write_json_durable`).
- A directory is assembled under a fresh temporary directory beside its target
  (:func:`staging_dir`, ``tempfile.mkdtemp``) and published whole (:func:`publish_dir`).
- Temporary names are ``.<target name>.<pid>.<random>.tmp``: :func:`remove_stale_tmp` deletes
  those of processes that are gone (killed mid-write).

Standard library only (the device runtime imports it without torch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"
FILE_MODE = 0o644  # mkstemp creates 0600; artifacts are meant to be shared like any other file


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path) -> None:
    """fsync a file or a directory (a directory: so a rename inside it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` for the caller to fill by name (for writers that
    take a path, like ``numpy.lib.format.open_memmap``); when the block ends it is fsynced and
    renamed over ``path`` and the directory fsynced; on an exception it is removed."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=TMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_path(path.parent)


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """An open temporary file beside ``path`` (``mode`` "wb" or "w"), published like
    :func:`atomic_path` when the block ends."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_bytes_durable(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all-or-nothing."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_json_durable(path, obj, indent: int = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON, all-or-nothing."""
    write_bytes_durable(path, (json.dumps(obj, indent=indent) + "\n").encode())


@contextlib.contextmanager
def staging_dir(out) -> Iterator[Path]:
    """A fresh temporary directory beside ``out`` to assemble it in; removed on an exception (and
    whatever is left of it after :func:`publish_dir` moved it into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), suffix=TMP_SUFFIX, dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out`` so that ``out`` is always whole: every
    file in ``tmp`` and ``tmp`` itself are fsynced first; an existing ``out`` is moved aside and
    removed only after the new one is in place."""
    out = Path(out)
    for f in Path(tmp).rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_tmp(folder) -> None:
    """Delete temporary files (``.<name>.<pid>.<random>.tmp``) of processes that are gone."""
    for f in Path(folder).glob(f".*{TMP_SUFFIX}"):
        parts = f.name.split(".")
        pid = parts[-3] if len(parts) >= 4 else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                if f.is_dir():
                    shutil.rmtree(f)
                else:
                    f.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """An exclusive advisory lock on ``path`` (fcntl.flock) for one writer at a time."""

    def __init__(self, path):
        self.path, self.fd = Path(path), None

    def __enter__(self):
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        self.fd = os.open(self.path, flags, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
