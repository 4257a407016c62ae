"""Durable files and directories, shared by run bundles, engine directories and the device.

Standard library only (the device runtime imports it without torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from .errors import EdgeclError


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


def write_json_durable(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out`` so that ``out`` is always whole: every
    file in ``tmp`` and ``tmp`` itself are fsynced first; an existing ``out`` is moved aside and
    removed only after the new one is in place."""
    for f in Path(tmp).rglob("*"):
        if f.is_file():
            fsync_path(f)
    fsync_path(tmp)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest_json(path, fmt: str, version: int, what: str, fix: str) -> dict:
    """Read ``path/manifest.json`` of a ``fmt`` directory, refusing anything else with one line.

    ``what`` names the kind of directory ("bundle", "engine directory"), ``fix`` the command that
    makes a good one.
    """
    path = Path(path)
    if not path.exists():
        raise EdgeclError(f"{what} {path} does not exist; {fix}")
    mf = path / "manifest.json"
    if not mf.is_file():
        raise EdgeclError(f"{path} is not an edgecl {what}: manifest.json is missing; {fix}")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise EdgeclError(f"{mf} cannot be read as JSON ({exc}); the {what} is damaged: {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise EdgeclError(f"{mf} is not an edgecl {what} manifest (format {got!r})")
    if manifest.get("format_version") != version:
        raise EdgeclError(f"{what} {path} has format version {manifest.get('format_version')}; this edgecl reads "
                          f"version {version}: {fix} with this edgecl")
    return manifest


def write_bytes_durable(path, data: bytes) -> None:
    """Replace ``path`` with ``data`` all-or-nothing: write a temporary file beside it, fsync it,
    rename it over ``path`` and fsync the directory (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_path(path.parent)


def remove_stale_tmp(folder) -> None:
    """Delete ``.*.tmp-<pid>`` files left by processes that are gone (killed mid-write)."""
    for f in Path(folder).glob(".*.tmp-*"):
        pid = f.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                f.unlink()
            except OSError:
                pass


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

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
