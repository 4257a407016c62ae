"""The class-statistics store: what the device has learned since export, crash-safe.

A directory (default ``ENGINE_DIR/store/``; the engine directory's hash-bound files are never
written) of generations::

    gen-00000007.safetensors   the state (below)
    gen-00000007.json          commit record: generation, sha256 and size of the .safetensors,
                               the engine's identity; written last, so it is the commit point
    .lock                      one writer at a time (flock)

Generation 0 is the engine directory itself (its ``stats.safetensors`` and heads). A commit
writes the new state to a temporary file, fsyncs it, renames it into place, does the same for
its JSON record, and fsyncs the directory (:func:`edgecl.core.durable.write_bytes_durable`); the last
``keep`` generations stay. Loading takes the newest generation whose record parses and whose
file matches the record's sha256, so a torn or corrupt file falls back to the previous one.

State: the class list in logit order (engine classes by their index in ``classes.json``,
possibly renamed or removed; enrolled classes by a uid), the enrolled rows (per learner the
rows its head took in: h = ReLU(W_rand^T f) for RanPAC, float32, with the uid of their class)
from which the enrolled part of the statistics is exact (G = G_engine + sum_rows w h h^T, Q
likewise), the weighting policy, and per learner the solved W so that start-up needs no
O(M^3) solve. Rows keep the store small (a class of 20 rows at M = 4096 is 330 KB, where a
dense G is M^2 x 8 = 128 MB) and make removing an enrolled class exact; G and Q stay additive,
so stores from several devices merge exactly (:func:`merge_states`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.durable import (
    FileLock,
    fsync_path,
    remove_stale_tmp,
    sha256_file,
    write_bytes_durable,
)
from edgecl.core.errors import EdgeclError
from edgecl.core.formats import ClassEntry, EngineIdentity, StoreMeta, StoreRecord

KEEP = 2
_GEN = re.compile(r"^gen-(\d{8})\.json$")


def committed_generations(path) -> list:
    """Generation numbers with a commit record (``gen-NNNNNNNN.json``) in a store, newest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted((int(m.group(1)) for f in path.iterdir() if (m := _GEN.match(f.name))), reverse=True)


@dataclass
class StoreState:
    """One generation. ``classes``: :class:`~edgecl.core.formats.ClassEntry` (name, ``base``: index
    in classes.json, or ``uid``: enrolled id) in logit order; ``removed_base``: engine classes taken
    out; ``rows``: {learner: float32 [R, width]} (head inputs), ``row_uid`` int64 [R]; ``W``:
    {learner: a head's persisted solution (RanPAC: [M, C])}."""

    engine: EngineIdentity
    classes: list
    policy: dict
    removed_base: list = field(default_factory=list)
    rows: dict = field(default_factory=dict)
    row_uid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    W: dict = field(default_factory=dict)
    generation: int = 0
    next_uid: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def initial(cls, engine: EngineIdentity, names: list, policy: dict, widths: dict) -> "StoreState":
        """Generation 0: the engine directory's classes, nothing enrolled."""
        return cls(engine=engine, policy=dict(policy), classes=[ClassEntry(n, base=i) for i, n in enumerate(names)],
                   rows={ln: np.zeros((0, w), np.float32) for ln, w in widths.items()})

    @property
    def names(self) -> list:
        return [c.name for c in self.classes]

    def index(self, name: str) -> int:
        for i, c in enumerate(self.classes):
            if c.name == name:
                return i
        return -1

    def unchanged(self) -> bool:
        """Whether this state is still the engine directory's own (nothing enrolled, renamed... removed)."""
        return not self.removed_base and len(self.row_uid) == 0 and all(
            c.base == i for i, c in enumerate(self.classes))

    def rows_of(self, uid: int) -> np.ndarray:
        return np.where(self.row_uid == uid)[0]

    def counts(self) -> dict:
        """{uid: rows} of the enrolled classes."""
        uids, n = np.unique(self.row_uid, return_counts=True)
        return {int(u): int(c) for u, c in zip(uids, n)}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = StoreMeta(generation=self.generation, engine=self.engine, classes=self.classes, policy=self.policy,
                         removed_base=self.removed_base, next_uid=self.next_uid, history=self.history[-50:]).to_json()
        tensors = {"row_uid": np.ascontiguousarray(self.row_uid, dtype=np.int64)}
        for ln, r in self.rows.items():
            tensors[f"{ln}.rows"] = np.ascontiguousarray(r, dtype=np.float32)
        for ln, w in self.W.items():
            tensors[f"{ln}.W"] = np.ascontiguousarray(w, dtype=np.float32)
        return save(tensors, metadata={"state": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "store state") -> StoreState:
        from safetensors.numpy import load

        (n,) = struct.unpack("<Q", data[:8])
        meta = StoreMeta.parse(json.loads(json.loads(data[8:8 + n])["__metadata__"]["state"]), source)
        t = load(data)
        rows = {k[:-len(".rows")]: v for k, v in t.items() if k.endswith(".rows")}
        W = {k[:-len(".W")]: v for k, v in t.items() if k.endswith(".W")}
        return cls(engine=meta.engine, classes=meta.classes, policy=meta.policy, removed_base=meta.removed_base,
                   rows=rows, row_uid=t["row_uid"], W=W, generation=meta.generation, next_uid=meta.next_uid,
                   history=meta.history)


class ClassStore:
    """A store directory (module docstring). ``engine``: the engine's identity
    (:meth:`edgecl.core.formats.EngineManifest.identity`)."""

    def __init__(self, path, engine: EngineIdentity, log: Callable = print):
        self.path, self.engine, self.log = Path(path), engine, log
        self.seen_generation = 0  # the newest committed generation when last loaded/committed

    def generations(self) -> list:
        return committed_generations(self.path)

    def _files(self, gen: int) -> tuple:
        return self.path / f"gen-{gen:08d}.safetensors", self.path / f"gen-{gen:08d}.json"

    def _refuse_other_engine(self, engine: EngineIdentity) -> None:
        if engine != self.engine:
            raise EdgeclError(f"store {self.path} belongs to another engine (model sha256 "
                              f"{str(engine.model_sha256)[:12]}..., this engine directory has "
                              f"{str(self.engine.model_sha256)[:12]}...); use the engine directory it was made "
                              f"with, or pass another --store/--out")

    def _record(self, gen: int) -> StoreRecord:
        """Generation ``gen``'s commit record; a damaged one raises ValueError (the caller falls back)."""
        try:
            record = StoreRecord.read(self._files(gen)[1])
        except EdgeclError as exc:
            raise ValueError(str(exc)) from None
        if record.generation != gen:
            raise ValueError(f"record says generation {record.generation}")
        return record

    def _check_engine(self, gen: int) -> None:
        """Refuse to commit on top of another engine's store (an unreadable record is no evidence)."""
        try:
            record = self._record(gen)
        except ValueError:
            return
        self._refuse_other_engine(record.engine)

    def _read(self, gen: int) -> StoreState:
        data_file = self._files(gen)[0]
        record = self._record(gen)
        self._refuse_other_engine(record.engine)
        data = data_file.read_bytes()
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ValueError(f"{data_file.name} does not match its record (torn or corrupt)")
        try:
            state = StoreState.from_bytes(data, str(data_file))
        except EdgeclError as exc:
            raise ValueError(str(exc)) from None
        state.generation = gen
        return state

    def load(self) -> StoreState | None:
        """The newest good generation, or None (no store yet: generation 0, the engine dir)."""
        gens = self.generations()
        self.seen_generation = gens[0] if gens else 0
        for gen in gens:
            try:
                return self._read(gen)
            except EdgeclError:
                raise
            except Exception as exc:  # noqa: BLE001 - damaged generation: say so, fall back
                self.log(f"store {self.path}: generation {gen} is unusable ({exc}); falling back to the previous one")
        if gens:
            self.log(f"store {self.path}: no generation is readable; starting from the engine directory")
        return None

    def commit(self, state: StoreState, expect_generation: int | None = None) -> int:
        """Write ``state`` as the next generation, all-or-nothing; returns its number.

        ``expect_generation``: the newest generation when ``state`` was loaded
        (``seen_generation``); if another process committed in between, refuse (the caller
        reloads and retries)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / ".lock"):
            remove_stale_tmp(self.path)
            gens = self.generations()
            latest = gens[0] if gens else 0
            if gens:
                self._check_engine(gens[0])
            if expect_generation is not None and latest != expect_generation:
                raise EdgeclError(f"store {self.path} changed while this process worked (generation {latest}, "
                                  f"expected {expect_generation}); run the command again")
            gen = latest + 1
            state.generation, state.engine = gen, self.engine
            data = state.to_bytes()
            data_file, record_file = self._files(gen)
            write_bytes_durable(data_file, data)
            record = StoreRecord(generation=gen, file=data_file.name, bytes=len(data),
                                 sha256=hashlib.sha256(data).hexdigest(), engine=self.engine,
                                 classes=len(state.classes), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            write_bytes_durable(record_file, json.dumps(record.to_json(), indent=1).encode())  # the commit point
            self._prune(gen)
        self.seen_generation = gen
        return gen

    def _prune(self, newest: int) -> None:
        removed = False
        for f in self.path.glob("gen-*"):
            m = re.match(r"^gen-(\d{8})\.", f.name)
            if m and not newest - KEEP < int(m.group(1)) <= newest:  # older than the kept ones, or an orphan
                f.unlink()
                removed = True
        if removed:
            fsync_path(self.path)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("gen-*")) if self.path.is_dir() else 0


def store_record(path) -> StoreRecord:
    """The newest readable commit record of a store directory (for ``merge``), without an engine."""
    path = Path(path)
    if not path.is_dir():
        raise EdgeclError(f"store {path} does not exist; enroll a class first (edgecl enroll ENGINE_DIR ...)")
    for gen in committed_generations(path):
        try:
            record = StoreRecord.read(path / f"gen-{gen:08d}.json")
            if sha256_file(path / record.file) == record.sha256:
                return record
        except (OSError, EdgeclError):
            continue
    raise EdgeclError(f"{path} holds no readable store generation (gen-*.json with a matching .safetensors)")


def merge_states(states: list, names: list) -> StoreState:
    """Sum the statistics of several stores of one engine: enrolled rows are concatenated per
    class name (G and Q are sums over rows, so this is their exact sum), engine classes keep
    their statistics once (the shared baseline), removals and renames are united.
    ``names``: the stores' paths, for messages."""
    first = states[0]
    for st, name in zip(states[1:], names[1:]):
        if st.engine != first.engine:
            raise EdgeclError(f"cannot merge {name} with {names[0]}: they belong to different engines (model sha256 "
                              f"{str(st.engine.model_sha256)[:12]}... vs {str(first.engine.model_sha256)[:12]}...)")
        if st.policy != first.policy:
            raise EdgeclError(f"cannot merge {name} with {names[0]}: different enrollment weighting "
                              f"({st.policy} vs {first.policy})")
    learners = list(first.rows)
    base_names: dict = {}
    removed = set()
    for st, name in zip(states, names):
        removed |= set(st.removed_base)
        for c in st.classes:
            if c.base is not None and base_names.setdefault(c.base, c.name) != c.name:
                raise EdgeclError(f"cannot merge: engine class {c.base} is named {base_names[c.base]!r} in "
                                  f"one store and {c.name!r} in {name}; rename it the same way first")
    merged = StoreState(engine=first.engine, classes=[], policy=first.policy, removed_base=sorted(removed))
    merged.classes = [ClassEntry(base_names[b], base=b) for b in sorted(base_names) if b not in removed]
    taken = {c.name for c in merged.classes}
    rows = {ln: [] for ln in learners}
    uids = []
    by_name: dict = {}
    for st in states:
        for c in st.classes:
            if c.base is not None:
                continue
            if c.name in taken and c.name not in by_name:
                raise EdgeclError(f"cannot merge: enrolled class {c.name!r} has the name of an engine class")
            if c.name not in by_name:
                by_name[c.name] = merged.next_uid
                merged.classes.append(ClassEntry(c.name, uid=merged.next_uid))
                merged.next_uid += 1
            sel = st.rows_of(c.uid)
            for ln in learners:
                rows[ln].append(st.rows[ln][sel])
            uids.append(np.full(len(sel), by_name[c.name], np.int64))
    merged.rows = {ln: (np.concatenate(v) if v else np.zeros((0, first.rows[ln].shape[1]), np.float32))
                   for ln, v in rows.items()}
    merged.row_uid = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    merged.history = [{"op": "merge", "stores": [str(n) for n in names], "time": time.time()}]
    return merged


def merge_stores(stores: list, out, log: Callable = print) -> tuple:
    """``edgecl merge``: read the newest generation of each store, merge them
    (:func:`merge_states`) and commit the result to the store ``out`` (which may be one of them).
    Returns (merged state, committed generation)."""
    states = []
    for path in stores:
        record = store_record(path)
        state = ClassStore(path, record.engine, log=log).load()
        if state is None:
            raise EdgeclError(f"{path} holds no readable store generation")
        states.append(state)
    merged = merge_states(states, [str(p) for p in stores])
    gen = ClassStore(out, merged.engine, log=log).commit(merged)
    return merged, gen


def default_store_path(engine_dir) -> Path:
    return Path(engine_dir) / "store"


def ensure_not_bound(engine_dir, store_path, manifest) -> None:
    """The store must not overwrite a file the engine manifest binds."""
    rel = os.path.relpath(Path(store_path).resolve(), Path(engine_dir).resolve())
    for name in manifest.files:
        if name == rel or name.startswith(rel.rstrip("/") + "/"):
            raise EdgeclError(f"--store {store_path} would overwrite {name} of the engine directory; "
                              "choose another path")
