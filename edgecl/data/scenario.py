"""Class-incremental scenarios: the split ``B{base}Inc{K}``, a seeded class order cut into
sessions (docs/DESIGN.md, "Benchmark protocol")."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..core.errors import EdgeclError

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

