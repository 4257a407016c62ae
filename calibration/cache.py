"""Calibration caches and their keys.

A cache (ONNX Runtime tensor ranges, or a TensorRT IInt8EntropyCalibrator2 cache) is stored as
``<stem>.cache`` beside ``<stem>.key.json``. The key is (model sha256, data sha256, method,
tool, tool version). :meth:`CalibrationCache.lookup` returns the cache only when the stored key
equals the wanted one; otherwise it says why (which field changed) through ``log`` and returns
None, so a stale cache is never reused silently.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from edgecl.core.durable import write_bytes_durable, write_json_durable


@dataclass(frozen=True)
class CacheKey:
    model_sha256: str
    data_sha256: str
    method: str
    tool: str
    tool_version: str

    def diff(self, other: "CacheKey") -> list:
        return [f for f in asdict(self) if getattr(self, f) != getattr(other, f)]


class CalibrationCache:
    def __init__(self, directory, stem: str):
        self.dir, self.stem = Path(directory), stem

    @property
    def path(self) -> Path:
        return self.dir / f"{self.stem}.cache"

    @property
    def key_path(self) -> Path:
        return self.dir / f"{self.stem}.key.json"

    def stored_key(self) -> Optional[CacheKey]:
        try:
            return CacheKey(**json.loads(self.key_path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def lookup(self, key: CacheKey, log: Callable = print) -> Optional[Path]:
        if not self.path.is_file():
            return None
        stored = self.stored_key()
        if stored is None:
            log(f"calibration cache {self.path} has no readable key; recalibrating")
            return None
        changed = key.diff(stored)
        if changed:
            log(f"calibration cache {self.path} is stale ({', '.join(changed)} changed); recalibrating")
            return None
        log(f"calibration cache {self.path}: key matches, reusing it")
        return self.path

    def store(self, key: CacheKey, content=None, source: Optional[Path] = None) -> Path:
        """Write the cache (bytes ``content`` or a copy of ``source``) and then its key, each atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        write_bytes_durable(self.path, Path(source).read_bytes() if source is not None else bytes(content))
        write_json_durable(self.key_path, asdict(key))
        return self.path

    def invalidate(self) -> None:
        for p in (self.path, self.key_path):
            if p.exists():
                p.unlink()
