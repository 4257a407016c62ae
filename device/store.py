"""The class-statistics store: what the device has learned since export, crash-safe.

A directory (default ``ENGINE_DIR/store/``; the engine directory's hash-bound files are never
written) of generations::

    gen-00000007.safetensors   the state (below)
    gen-00000007.json          commit record: generation, sha256 and size of the .safetensors,
                               the engine's identity; written last, so it is the commit point
    history/                   every older generation (below)
    .lock                      one writer at a time (flock)
    corrupt-<UTC time>/        generations found unreadable, set aside (never deleted)

Generation 0 is the engine directory itself (its ``stats.safetensors`` and heads). A commit
writes the new state to a temporary file, fsyncs it, renames it into place, does the same for
its JSON record, and fsyncs the directory (:func:`edgecl.core.durable.write_bytes_durable`); the last
``keep`` generations stay. Loading takes the newest generation whose record parses and whose
file matches the record's sha256, so a torn or corrupt file falls back to the previous one; the
generations it could not read are moved to a fresh ``corrupt-<UTC time>/`` folder of the store
(one log line names it), and a commit's pruning sets aside, never deletes, a generation it
cannot read. Generation numbers keep rising past the set-aside ones.

State: the class list in logit order (engine classes by their index in ``classes.json``,
possibly renamed or removed; enrolled classes by a uid), the enrolled rows (per learner the
rows its head took in: h = ReLU(W_rand^T f) for RanPAC, float32, with the uid of their class
and the index of their contribution) from which the enrolled part of the statistics is exact
(G = G_engine + sum_rows w h h^T, Q likewise), the weighting policy, and per learner the solved
W so that start-up needs no O(M^3) solve. Rows keep the store small (a class of 20 rows at
M = 4096 is 330 KB, where a dense G is M^2 x 8 = 128 MB) and make removing an enrolled class
exact; G and Q stay additive, so stores from several devices merge exactly (:func:`merge_states`).

Contributions: the rows one enrollment added carry a stable 128-bit id
(:class:`~edgecl.core.formats.Contribution`: random when enrolled; for a store written before
ids, derived from sha256 of the class name and the rows' bytes when it is read), so a merge
takes the union of contributions by id and is idempotent and order-free. Removing an enrolled
class keeps its contributions' ids as tombstones (``removed_contributions``), which a merge
applies to every store.

History (:meth:`ClassStore.history`, :meth:`ClassStore.state_at`): every committed generation
is kept. The root holds the newest ``KEEP`` generation files (full states with the solved W:
start-up needs no solve); a commit moves older ones into ``history/`` (renames where it used to
delete: a commit writes nothing more than before). Loading the store (and ``edgecl serve`` after
its changes) compacts them once ``COMPACT_EVERY`` generations (or ``COMPACT_BYTES``) wait there:
one ``history/hist-NNNNNNNN.safetensors`` holds per generation an entry (:class:`~edgecl.core.formats.HistoryEntry`:
number, time, the operations that made it, its classes and contributions; a few KB) and the rows
of the contributions no earlier history file keeps, so rows are stored once however many
generations hold them; it is written durably before the moved files are removed. Any generation
can be restored (:meth:`ClassStore.state_at`; from a compacted entry without its W: the heads
solve once), and a rollback is a new commit of an earlier state (:meth:`ClassHeads.rollback
<edgecl.device.enroll.ClassHeads.rollback>`), so nothing is ever lost. The operations of a
generation are what its state's ``history`` adds to the previous generation's. Stores written
before history load as they are (their pruned generations were deleted and are not listed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edgecl.core.durable import (
    FileLock,
    fsync_path,
    remove_stale_tmp,
    sha256_file,
    write_bytes_durable,
)
from edgecl.core.errors import EdgeclError, one_line
from edgecl.core.formats import (
    HISTORY_FORMAT,
    HISTORY_VERSION,
    ClassEntry,
    Contribution,
    EngineIdentity,
    HistoryEntry,
    RowsRef,
    StoreMeta,
    StoreRecord,
)
from edgecl.core.records import to_dict

KEEP = 2  # generation files kept in the store's root (every generation is kept in history/: module docstring)
HISTORY = "history"  # the folder of the older generations
COMPACT_EVERY = 8  # generations moved to history/ that loading the store compacts into one history file ...
COMPACT_BYTES = 64 << 20  # ... or as many as hold this many bytes
COMPACT_IN_COMMIT = 8  # a commit itself compacts only past this many times those (a writer that never reloads)
_HIST = re.compile(r"^hist-(\d{8})\.safetensors$")
_GEN = re.compile(r"^gen-(\d{8})\.json$")
_GEN_FILE = re.compile(r"^gen-(\d{8})\.")
SET_ASIDE = "corrupt-"  # prefix of the folders that hold unreadable generations


def new_contribution_id() -> str:
    """A fresh contribution id: 128 random bits as 32 hex digits."""
    return os.urandom(16).hex()


def derived_contribution_id(name: str, rows: dict) -> str:
    """The id of a contribution written before ids: sha256 of the class name and the rows' bytes
    (per learner, in name order, float32 little-endian), 32 hex digits; the same rows under the
    same name give the same id in every store."""
    h = hashlib.sha256(b"edgecl-store contribution\0" + name.encode() + b"\0")
    for ln in sorted(rows):
        r = np.ascontiguousarray(rows[ln], dtype="<f4")
        h.update(f"{ln}\0{r.shape}\0".encode())
        h.update(r.tobytes())
    return h.hexdigest()[:32]


def committed_generations(path) -> list:
    """Generation numbers with a commit record (``gen-NNNNNNNN.json``) in a store, newest first."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted((int(m.group(1)) for f in path.iterdir() if (m := _GEN.match(f.name))), reverse=True)


class StoreChanged(EdgeclError):
    """Another process committed to the store since this one loaded it (reload and retry)."""


class NoGeneration(EdgeclError):
    """A generation number the store never reached."""


class GenerationGone(EdgeclError):
    """A generation the store had whose state is no longer on disk, or is damaged."""


def read_history_header(path) -> list:
    """The entries of a history file as plain JSON (its safetensors header only: the rows are not
    read); raises ValueError or OSError when it is not one."""
    meta = safetensors_metadata(path)
    head = json.loads(meta["history"])
    if not isinstance(head, dict) or head.get("format") != HISTORY_FORMAT or \
            head.get("format_version") != HISTORY_VERSION or not isinstance(head.get("entries"), list):
        raise ValueError(f"not an {HISTORY_FORMAT} v{HISTORY_VERSION} file")
    return [e for e in head["entries"] if isinstance(e, dict) and isinstance(e.get("generation"), int)]


def safetensors_metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file, reading its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("truncated")
        (n,) = struct.unpack("<Q", head)
        if n > 1 << 28:
            raise ValueError("header too large")
        meta = json.loads(f.read(n)).get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def rows_sha256(block: dict) -> str:
    """sha256 of a contribution's rows ({learner: float32 [k, width]}, in learner order)."""
    h = hashlib.sha256()
    for ln in sorted(block):
        r = np.ascontiguousarray(block[ln], dtype="<f4")
        h.update(f"{ln}\0{r.shape}\0".encode())
        h.update(r.tobytes())
    return h.hexdigest()


@dataclass
class StoreState:
    """One generation. ``classes``: :class:`~edgecl.core.formats.ClassEntry` (name, ``base``: index
    in classes.json, or ``uid``: enrolled id) in logit order; ``removed_base``: engine classes taken
    out; ``rows``: {learner: float32 [R, width]} (head inputs), ``row_uid`` int64 [R] (the class of
    each row), ``row_contrib`` int64 [R] (each row's index in ``contributions``, the
    :class:`~edgecl.core.formats.Contribution` records of the enrollments that added them);
    ``removed_contributions``: ids of contributions whose class was removed; ``W``: {learner: a
    head's persisted solution (RanPAC: [M, C])}."""

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
    contributions: list = field(default_factory=list)
    row_contrib: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    removed_contributions: list = field(default_factory=list)

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

    def contribution_rows(self) -> list:
        """Per contribution (in ``contributions`` order), the indices of its rows."""
        order = np.argsort(self.row_contrib, kind="stable")
        bounds = np.searchsorted(self.row_contrib[order], np.arange(len(self.contributions) + 1))
        return [order[bounds[i]:bounds[i + 1]] for i in range(len(self.contributions))]

    # ----------------------------------------------------------------- contributions
    def add_contribution(self, uid: int, rows: dict, when: Optional[float] = None,
                         cid: Optional[str] = None) -> Contribution:
        """Append ``rows`` ({learner: [k, width]}) to enrolled class ``uid`` as one contribution
        (a fresh random id unless ``cid``; enrolled now unless ``when``)."""
        k = len(rows[next(iter(self.rows))])
        c = Contribution(id=cid or new_contribution_id(), uid=int(uid), rows=int(k),
                         time=time.time() if when is None else when)
        for ln in self.rows:
            self.rows[ln] = np.concatenate([self.rows[ln], np.asarray(rows[ln], np.float32)])
        self.row_uid = np.concatenate([self.row_uid, np.full(k, uid, np.int64)])
        self.row_contrib = np.concatenate([self.row_contrib, np.full(k, len(self.contributions), np.int64)])
        self.contributions.append(c)
        return c

    def drop_class_rows(self, uid: int) -> list:
        """Remove enrolled class ``uid``'s rows and contributions; their ids become tombstones
        (``removed_contributions``: a merge drops them from every store). Returns the ids."""
        gone = [c.id for c in self.contributions if c.uid == uid]
        kept = [i for i, c in enumerate(self.contributions) if c.uid != uid]
        remap = np.full(len(self.contributions), -1, np.int64)
        remap[kept] = np.arange(len(kept))
        keep = self.row_uid != uid
        self.rows = {ln: r[keep] for ln, r in self.rows.items()}
        self.row_uid = self.row_uid[keep]
        self.row_contrib = remap[self.row_contrib[keep]]
        self.contributions = [self.contributions[i] for i in kept]
        known = set(self.removed_contributions)
        self.removed_contributions += [i for i in gone if i not in known]
        return gone

    def check_contributions(self, source: str) -> None:
        """Refuse a state whose rows and contribution table disagree (one line naming ``source``)."""
        n, ids = len(self.row_uid), [c.id for c in self.contributions]
        why = None
        if any(len(r) != n for r in self.rows.values()) or len(self.row_contrib) != n:
            why = "rows, row_uid and row_contrib differ in length"
        elif len(set(ids)) != len(ids) or not all(ids):
            why = "contribution ids are empty or repeated"
        elif n and (self.row_contrib.min() < 0 or self.row_contrib.max() >= len(ids)):
            why = "row_contrib points past the contributions"
        else:
            counts = np.bincount(self.row_contrib, minlength=len(ids)) if n else np.zeros(len(ids), np.int64)
            uids = np.array([c.uid for c in self.contributions], np.int64)
            if any(int(k) != c.rows for k, c in zip(counts, self.contributions)):
                why = "a contribution's row count does not match its rows"
            elif n and not np.array_equal(uids[self.row_contrib], self.row_uid):
                why = "a row's class differs from its contribution's"
        if why:
            raise EdgeclError(f"{source}: the enrolled rows do not match their contributions ({why})")

    def derive_contributions(self) -> None:
        """A state written before contribution ids: each enrolled class's rows become one
        contribution with the id :func:`derived_contribution_id` (deterministic, so merging such
        stores is idempotent too) and the time of the class's first enrollment in the history
        (None when the history does not say)."""
        first: dict = {}
        for h in self.history:
            if isinstance(h, dict) and h.get("op") == "enroll" and isinstance(h.get("time"), (int, float)):
                first[h.get("name")] = min(first.get(h.get("name"), math.inf), float(h["time"]))
        names = {c.uid: c.name for c in self.classes if c.uid is not None}
        uids = [c.uid for c in self.classes if c.uid is not None]
        uids += sorted(int(u) for u in np.unique(self.row_uid) if int(u) not in names)  # rows of no class
        self.contributions, self.row_contrib = [], np.zeros(len(self.row_uid), np.int64)
        for uid in uids:
            sel = self.rows_of(uid)
            if not len(sel):
                continue
            name = names.get(uid, "")
            cid = derived_contribution_id(name, {ln: r[sel] for ln, r in self.rows.items()})
            self.row_contrib[sel] = len(self.contributions)
            self.contributions.append(Contribution(id=cid, uid=int(uid), rows=len(sel), time=first.get(name)))

    # ----------------------------------------------------------------- bytes
    def meta(self) -> StoreMeta:
        """The state's metadata (everything but the tensors), as the generation file holds it."""
        return StoreMeta(generation=self.generation, engine=self.engine, classes=self.classes, policy=self.policy,
                         removed_base=self.removed_base, next_uid=self.next_uid, history=self.history[-50:],
                         contributions=self.contributions, removed_contributions=self.removed_contributions)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = self.meta().to_json()
        tensors = {"row_uid": np.ascontiguousarray(self.row_uid, dtype=np.int64),
                   "row_contrib": np.ascontiguousarray(self.row_contrib, dtype=np.int64)}
        for ln, r in self.rows.items():
            tensors[f"{ln}.rows"] = np.ascontiguousarray(r, dtype=np.float32)
        for ln, w in self.W.items():
            tensors[f"{ln}.W"] = np.ascontiguousarray(w, dtype=np.float32)
        return save(tensors, metadata={"state": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "store state") -> StoreState:
        """A state from a generation's bytes; a state written before contribution ids gets them
        derived (:meth:`derive_contributions`)."""
        from safetensors.numpy import load

        (n,) = struct.unpack("<Q", data[:8])
        meta = StoreMeta.parse(json.loads(json.loads(data[8:8 + n])["__metadata__"]["state"]), source)
        t = load(data)
        rows = {k[:-len(".rows")]: v for k, v in t.items() if k.endswith(".rows")}
        W = {k[:-len(".W")]: v for k, v in t.items() if k.endswith(".W")}
        state = cls(engine=meta.engine, classes=meta.classes, policy=meta.policy, removed_base=meta.removed_base,
                    rows=rows, row_uid=t["row_uid"], W=W, generation=meta.generation, next_uid=meta.next_uid,
                    history=meta.history, contributions=meta.contributions,
                    removed_contributions=meta.removed_contributions)
        if "row_contrib" in t:
            state.row_contrib = t["row_contrib"].astype(np.int64)
        elif not meta.contributions:
            state.derive_contributions()
        state.check_contributions(source)
        return state


class ClassStore:
    """A store directory (module docstring). ``engine``: the engine's identity
    (:meth:`edgecl.core.formats.EngineManifest.identity`)."""

    def __init__(self, path, engine: EngineIdentity, log: Callable = print):
        self.path, self.engine, self.log = Path(path), engine, log
        self.seen_generation = 0  # the store's highest generation number when last loaded/committed
        self.unreadable: set = set()  # generations load() found unreadable (never deleted)
        self.history_path = self.path / HISTORY
        self._headers: dict = {}  # history file -> ((mtime, size), its entries)
        self._verified: dict = {}  # (file, mtime, size) -> what checking it found (rows' sha256, a data sha256)

    def generations(self) -> list:
        return committed_generations(self.path)

    def _files(self, gen: int, folder: Optional[Path] = None) -> tuple:
        folder = self.path if folder is None else folder
        return folder / f"gen-{gen:08d}.safetensors", folder / f"gen-{gen:08d}.json"

    def _refuse_other_engine(self, engine: EngineIdentity) -> None:
        if engine != self.engine:
            raise EdgeclError(f"store {self.path} belongs to another engine (model sha256 "
                              f"{str(engine.model_sha256)[:12]}..., this engine directory has "
                              f"{str(self.engine.model_sha256)[:12]}...); use the engine directory it was made "
                              f"with, or pass another --store/--out")

    def _record(self, gen: int, folder: Optional[Path] = None) -> StoreRecord:
        """Generation ``gen``'s commit record; a damaged one raises ValueError (the caller falls back)."""
        try:
            record = StoreRecord.read(self._files(gen, folder)[1])
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

    def _read(self, gen: int, check_engine: bool = True, parse: bool = True,
              folder: Optional[Path] = None) -> StoreState | None:
        """Generation ``gen``'s state (``parse=False``: only check its record and its data's sha256,
        return None); a damaged generation raises ValueError or OSError. ``folder``: where its
        files are (the root, or ``history/``)."""
        data_file = self._files(gen, folder)[0]
        record = self._record(gen, folder)
        if check_engine:
            self._refuse_other_engine(record.engine)
        data = data_file.read_bytes()
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ValueError(f"{data_file.name} does not match its record (torn or corrupt)")
        if not parse:
            return None
        try:
            state = StoreState.from_bytes(data, str(data_file))
        except EdgeclError as exc:
            raise ValueError(str(exc)) from None
        state.generation = gen
        return state

    def _unreadable(self, gen: int, parse: bool = True, folder: Optional[Path] = None) -> Optional[str]:
        """Why generation ``gen`` cannot be read (its record, its data against the record's sha256,
        and unless ``parse`` is False its state), or None when it can."""
        try:
            self._read(gen, check_engine=False, parse=parse, folder=folder)
        except Exception as exc:  # noqa: BLE001 - any failure to read makes it unreadable
            return one_line(exc)
        return None

    def set_aside_generations(self) -> list:
        """Numbers of the generations moved to ``corrupt-*/`` folders of the store."""
        if not self.path.is_dir():
            return []
        return [int(m.group(1)) for d in self.path.glob(f"{SET_ASIDE}*") if d.is_dir()
                for f in d.iterdir() if (m := _GEN_FILE.match(f.name))]

    def changed(self) -> bool:
        """Whether the store's generations moved since this process last loaded or committed."""
        return self._high_water() != self.seen_generation

    def _high_water(self) -> int:
        """The highest generation number the store has used (committed, kept in history/ or set
        aside): the next commit takes the number after it, so a number is never reused."""
        return max([0, *self.generations()[:1], *self.set_aside_generations(), *self._history_numbers()[:1]])

    def _history_numbers(self) -> list:
        """Generation numbers in history/ (moved generations, and the newest of each history
        file), newest first."""
        if not self.history_path.is_dir():
            return []
        return sorted((int(m.group(1)) for f in self.history_path.iterdir()
                       if (m := _GEN.match(f.name) or _HIST.match(f.name))), reverse=True)

    def _moved(self) -> list:
        """Generations moved to history/ (their files, not yet compacted), oldest first."""
        if not self.history_path.is_dir():
            return []
        return sorted(int(m.group(1)) for f in self.history_path.iterdir() if (m := _GEN.match(f.name)))

    def _set_aside(self, gens: list, where: Optional[Path] = None) -> Optional[Path]:
        """Move the files of generations ``gens`` (in ``where``: the root, or history/) that are
        still there and still unreadable to a fresh ``corrupt-<UTC time>/`` folder of the store
        (the caller holds the lock); one log line names it. Nothing is deleted; a failure to move
        is logged and leaves the files in place."""
        todo = [g for g in gens if any(f.exists() for f in self._files(g, where))
                and self._unreadable(g, folder=where) is not None]
        if not todo:
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            for k in range(1, 1000):
                folder = self.path / (f"{SET_ASIDE}{stamp}" if k == 1 else f"{SET_ASIDE}{stamp}-{k}")
                try:
                    folder.mkdir()
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(f"{folder} and 998 others like it exist")
            for g in todo:
                for f in self._files(g, where):  # the data first: a record left behind is still seen as unreadable
                    if f.exists():
                        os.replace(f, folder / f.name)
            fsync_path(folder)
            fsync_path(self.path)
            if where is not None:
                fsync_path(where)
        except OSError as exc:
            self.log(f"store {self.path}: could not set aside the unreadable generation(s) "
                     f"{', '.join(map(str, todo))} ({one_line(exc)}); they stay where they are")
            return None
        self.log(f"store {self.path}: moved the unreadable generation(s) {', '.join(map(str, todo))} to {folder} "
                 f"(set aside, not deleted)")
        return folder

    def load(self) -> StoreState | None:
        """The newest good generation, or None (no store yet: generation 0, the engine dir).
        Generations it cannot read are set aside (:meth:`_set_aside`) before anything is pruned."""
        gens = self.generations()
        state, bad = None, []
        for gen in gens:
            try:
                state = self._read(gen)
                break
            except EdgeclError:
                raise
            except Exception as exc:  # noqa: BLE001 - damaged generation: say so, fall back
                self.log(f"store {self.path}: generation {gen} is unusable ({exc}); falling back to the previous one")
                bad.append(gen)
        self.unreadable |= set(bad)
        if bad:
            try:
                with FileLock(self.path / ".lock"):
                    self._set_aside(bad)
            except OSError as exc:  # a store this process may not write (read-only media): leave it as it is
                self.log(f"store {self.path}: could not lock it to set aside the unreadable generation(s) "
                         f"({one_line(exc)}); they stay where they are")
        if gens and state is None:
            self.log(f"store {self.path}: no generation is readable; starting from the engine directory")
        if self.needs_compaction():
            self.compact()
        self.seen_generation = self._high_water()
        return state

    def commit(self, state: StoreState, expect_generation: int | None = None) -> int:
        """Write ``state`` as the next generation, all-or-nothing; returns its number.

        ``expect_generation``: the newest generation when ``state`` was loaded
        (``seen_generation``); if another process committed in between, refuse (the caller
        reloads and retries). A file-system error (a full disk, a read-only store, a planted
        symlink) is one line: nothing was committed and the store is as it was."""
        try:
            return self._commit(state, expect_generation)
        except OSError as exc:
            raise EdgeclError(f"cannot commit to store {self.path} ({one_line(exc)}): nothing was committed and its "
                              f"generations are as they were; free space or make it writable, and run again") from None

    def _commit(self, state: StoreState, expect_generation: int | None) -> int:
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / ".lock"):
            for folder in (self.path, self.history_path):
                if folder.is_dir():
                    remove_stale_tmp(folder)
            gens = self.generations()
            latest = self._high_water()
            if gens:
                self._check_engine(gens[0])
            if expect_generation is not None and latest != expect_generation:
                raise StoreChanged(f"store {self.path} changed while this process worked (generation {latest}, "
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
            self.seen_generation = gen
            try:
                self._prune(gen)
            except OSError as exc:  # committed all the same: older generations stay a while longer
                self.log(f"store {self.path}: generation {gen} committed, but older ones were not pruned "
                         f"({one_line(exc)})")
        return gen

    def _prune(self, newest: int) -> None:
        """Keep the newest ``KEEP`` committed generation files (``newest`` among them) in the root;
        move older ones into history/ (renames: nothing is deleted) and compact history/ when
        enough waits there (:meth:`_compact`); remove orphans (a data file without its record: an
        interrupted commit). A committed generation whose record or data is damaged (the sha256
        check) is set aside instead (:meth:`_set_aside`), never deleted."""
        keep = {newest, *self.generations()[:KEEP]}
        old: dict = {}
        for f in self.path.glob("gen-*"):
            m = _GEN_FILE.match(f.name)
            if m and int(m.group(1)) not in keep:
                old.setdefault(int(m.group(1)), []).append(f)
        changed, unreadable = False, []
        for gen, files in sorted(old.items()):
            data_file, record_file = self._files(gen)
            if record_file.exists():
                if gen in self.unreadable or self._unreadable(gen, parse=False):
                    unreadable.append(gen)  # committed, but its bytes are not what was committed
                    continue
                self.history_path.mkdir(exist_ok=True)
                os.replace(record_file, self.history_path / record_file.name)  # the record first: a data file
                os.replace(data_file, self.history_path / data_file.name)  # left behind is moved next time
            elif (self.history_path / record_file.name).exists() and data_file.exists():
                os.replace(data_file, self.history_path / data_file.name)  # a move cut short
            else:
                for f in files:
                    f.unlink()  # an interrupted commit's data
            changed = True
        if unreadable:
            self._set_aside(unreadable)
        if changed:
            fsync_path(self.path)
        if self.needs_compaction(COMPACT_IN_COMMIT):
            self._compact()

    # ----------------------------------------------------------------- history
    def _history_files(self) -> list:
        """The history files, newest first."""
        if not self.history_path.is_dir():
            return []
        return sorted((f.name for f in self.history_path.iterdir() if _HIST.match(f.name)), reverse=True)

    def _entries(self, name: str) -> list:
        """The entries (plain JSON) of history file ``name`` ([] when it cannot be read), read once
        per version of the file."""
        f = self.history_path / name
        try:
            st = f.stat()
            version = (st.st_mtime_ns, st.st_size)
            if self._headers.get(name, (None,))[0] != version:
                self._headers[name] = (version, read_history_header(f))
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return self._headers[name][1]

    def _all_entries(self) -> dict:
        """{generation: (history file, entry)} over every history file (the newest file wins)."""
        out: dict = {}
        for name in self._history_files():
            for e in self._entries(name):
                out.setdefault(e["generation"], (name, e))
        return out

    def needs_compaction(self, factor: int = 1) -> bool:
        """Whether ``factor`` times ``COMPACT_EVERY`` generations (or ``COMPACT_BYTES``) wait in history/."""
        moved = self._moved()
        if len(moved) >= factor * COMPACT_EVERY:
            return True
        size = 0
        for g in moved:
            for f in self._files(g, self.history_path):
                try:
                    size += f.stat().st_size
                except OSError:
                    pass
        return bool(moved) and size >= factor * COMPACT_BYTES

    def compact(self) -> None:
        """Compact history/ (:meth:`_compact`) under the store's lock; a store this process may not
        write is left as it is (one log line)."""
        if not self._moved():
            return
        try:
            with FileLock(self.path / ".lock"):
                self._compact()
        except OSError as exc:
            self.log(f"store {self.path}: could not compact its history ({one_line(exc)}); it stays as it is")

    def _compact(self) -> None:
        """Compact the generations moved to history/ into one history file (the caller holds the
        lock): per generation an entry, and the rows of the contributions no history file keeps
        yet. The file is written durably before the moved files are removed; a moved generation
        that does not read is set aside. Loading the store compacts once ``COMPACT_EVERY`` of
        them (or ``COMPACT_BYTES``) wait; a commit only past ``COMPACT_IN_COMMIT`` times that, so
        commits stay as fast as they were."""
        from safetensors.numpy import save

        moved = self._moved()
        if not moved:
            return
        done = self._all_entries()
        homes: dict = {}
        for _file, e in done.values():
            for cid, ref in (e.get("rows") or {}).items():
                if isinstance(ref, dict) and isinstance(ref.get("file"), str) and _HIST.match(ref["file"]) and \
                        (self.history_path / ref["file"]).is_file():
                    homes.setdefault(cid, ref)
        todo = [g for g in moved if g not in done]
        name = f"hist-{max(todo or moved):08d}.safetensors"
        if todo and (self.history_path / name).exists():  # never replace a history file
            self.log(f"store {self.path}: {name} exists but lacks generations {todo}; they stay in history/ "
                     f"as they are")
            return
        before = [g for g in done if g < min(moved)]
        previous = done[max(before)][1]["state"].get("history") if before else None
        entries, tensors, bad, kept = [], {}, [], 0
        for g in todo:
            try:
                record = self._record(g, self.history_path)
                meta, blocks, widths = self._contributions_of(g)
            except Exception:  # noqa: BLE001 - damaged since it was moved: set aside below
                bad.append(g)
                continue
            rows = {}
            for c in meta["contributions"]:
                ref = homes.get(c["id"])
                if ref is None:
                    block = blocks[c["id"]]
                    key, kept = f"r{kept}", kept + 1
                    tensors.update({f"{key}.{ln}": b for ln, b in block.items()})
                    ref = homes[c["id"]] = to_dict(RowsRef(name, key, rows_sha256(block)))
                rows[c["id"]] = ref
            cumulative = meta.get("history") or []
            ops = [h for h in cumulative if h not in previous] if isinstance(previous, list) else cumulative[-1:]
            previous = cumulative
            entries.append({"generation": g, "created": record.created, "sha256": record.sha256,
                            "bytes": record.bytes, "state": {**meta, "generation": g}, "widths": widths, "rows": rows,
                            "ops": ops})
        if entries:
            head = {"format": HISTORY_FORMAT, "format_version": HISTORY_VERSION, "entries": entries}
            write_bytes_durable(self.history_path / name, save(tensors, metadata={"history": json.dumps(head)}))
        if bad:
            self._set_aside(bad, self.history_path)
        for g in moved:
            if g not in bad:
                for f in self._files(g, self.history_path):
                    if f.exists():
                        f.unlink()
        fsync_path(self.history_path)

    def _contributions_of(self, gen: int) -> tuple:
        """(metadata as plain JSON, {contribution id: {learner: rows}}, {learner: width}) of moved
        generation ``gen``, its data checked against its record (the compaction's fast path; a
        store written before contribution ids is read through :meth:`StoreState.from_bytes`)."""
        from safetensors.numpy import load

        data_file = self._files(gen, self.history_path)[0]
        record = self._record(gen, self.history_path)
        data = data_file.read_bytes()
        if len(data) != record.bytes or hashlib.sha256(data).hexdigest() != record.sha256:
            raise ValueError(f"{data_file.name} does not match its record")
        t = load(data)
        meta = json.loads(safetensors_metadata(data_file)["state"])
        if "row_contrib" not in t or not meta.get("contributions"):
            state = StoreState.from_bytes(data, str(data_file))
            meta, t = state.meta().to_json(), {"row_contrib": state.row_contrib,
                                               **{f"{ln}.rows": r for ln, r in state.rows.items()}}
        learners = sorted(k[:-len(".rows")] for k in t if k.endswith(".rows"))
        order = np.argsort(t["row_contrib"], kind="stable")
        bounds = np.searchsorted(t["row_contrib"][order], np.arange(len(meta["contributions"]) + 1))
        blocks = {c["id"]: {ln: np.ascontiguousarray(t[f"{ln}.rows"][order[bounds[i]:bounds[i + 1]]], dtype=np.float32)
                            for ln in learners} for i, c in enumerate(meta["contributions"])}
        return meta, blocks, {ln: int(t[f"{ln}.rows"].shape[1]) for ln in learners}

    def _rows_of_file(self, name: str) -> dict:
        """{key: sha256 of its rows} of history file ``name`` ({} when it cannot be read)."""
        from safetensors.numpy import load

        f = self.history_path / name
        try:
            st = f.stat()
        except OSError:
            return {}
        key = (str(f), st.st_mtime_ns, st.st_size)
        if key not in self._verified:
            blocks: dict = {}
            try:
                for tname, t in load(f.read_bytes()).items():
                    k, _, ln = tname.partition(".")
                    blocks.setdefault(k, {})[ln] = t
            except Exception:  # noqa: BLE001 - a damaged file keeps no rows
                blocks = {}
            self._verified[key] = {k: rows_sha256(b) for k, b in blocks.items()}
        return self._verified[key]

    def _rows_missing(self, entry: dict) -> Optional[str]:
        """Why the state of ``entry`` (plain JSON) cannot be rebuilt from the history files (rows
        missing or damaged), or None."""
        rows = entry.get("rows")
        contributions = (entry.get("state") or {}).get("contributions")
        if not isinstance(rows, dict) or not isinstance(contributions, list):
            return "its history entry is damaged"
        for c in contributions:
            cid = c.get("id") if isinstance(c, dict) else None
            ref = rows.get(cid) if isinstance(cid, str) else None
            if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not _HIST.match(ref["file"]):
                return "its history entry is damaged"
            if self._rows_of_file(ref["file"]).get(ref.get("key")) != ref.get("sha256"):
                return f"the rows of contribution {cid[:8]}... ({ref['file']}) are missing or damaged"
        return None

    def _full_ok(self, gen: int, folder: Path) -> Optional[dict]:
        """The metadata of generation ``gen``'s file in ``folder`` (plain JSON) when its record reads
        and its data matches it (hashed once per version of the file), else None."""
        try:
            record = self._record(gen, folder)
            data_file = self._files(gen, folder)[0]
            st = data_file.stat()
            key = (str(data_file), st.st_mtime_ns, st.st_size)
            if key not in self._verified:
                self._verified[key] = sha256_file(data_file)
            if st.st_size != record.bytes or self._verified[key] != record.sha256:
                return None
            meta = json.loads(safetensors_metadata(data_file)["state"])
            return {"created": record.created, "state": meta} if isinstance(meta, dict) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def history(self, limit: Optional[int] = None) -> list:
        """The store's generations newest first (at most ``limit``), each a dict: ``generation``,
        ``created`` (UTC), ``ops`` (what the commit changed: ``{"op": "enroll" | "rename" |
        "remove" | "rollback" | "merge", ...}``), ``classes`` (how many), ``enrolled`` (the
        enrolled classes' names), ``rows``, ``available`` (its state is on disk: a rollback can
        restore it) with ``reason`` when not. Generation 0 (the engine directory) is not listed.
        Read-only: it takes no lock."""
        high = self._high_water()
        full = {g: self.path for g in self.generations()}
        for g in self._moved():
            full.setdefault(g, self.history_path)
        entries = self._all_entries()
        numbers = sorted({n for n in set(full) | set(entries) if 0 < n <= high}, reverse=True)[:limit]
        items = []
        for n in numbers:
            item = {"generation": n, "created": None, "ops": None, "classes": None, "enrolled": [], "rows": None,
                    "available": False, "reason": None}
            found = self._full_ok(n, full[n]) if n in full else None
            source = found if found is not None else (entries[n][1] if n in entries else None)
            try:
                meta = source["state"]
                uids = {c["uid"] for c in meta["classes"] if c.get("uid") is not None}
                item.update(created=source.get("created"), classes=len(meta["classes"]),
                            enrolled=[c["name"] for c in meta["classes"] if c.get("uid") is not None],
                            rows=sum(c["rows"] for c in meta.get("contributions") or [] if c.get("uid") in uids),
                            _history=list(meta.get("history") or []))
            except (TypeError, KeyError, AttributeError):
                item["reason"] = "no record of it is readable (damaged)"
                items.append(item)
                continue
            if found is None and isinstance(source.get("ops"), list):
                item["ops"] = source["ops"]
            missing = None if found is not None else self._rows_missing(source)
            item["available"], item["reason"] = missing is None, missing
            items.append(item)
        for i, it in enumerate(items):
            cumulative = it.pop("_history", None) or []
            if it["ops"] is None:  # the difference from the next older generation's history
                older = items[i + 1].get("_history") if i + 1 < len(items) else None
                it["ops"] = [h for h in cumulative if h not in older] if older is not None else cumulative[-1:]
        return items

    def state_at(self, gen: int) -> Optional[StoreState]:
        """Generation ``gen``'s state: from its file while it has one (with its solved W), else
        rebuilt from its history entry and the contributions' rows (no W). None for generation 0
        (the engine directory's own state). :class:`NoGeneration` for a number the store never
        reached, :class:`GenerationGone` for one whose state is not on disk or is damaged."""
        high = self._high_water()
        if gen < 0 or gen > high:
            raise NoGeneration(f"store {self.path} has no generation {gen} (its generations are 0 to {high})")
        if gen == 0:
            return None
        for folder in (self.path, self.history_path):
            if self._files(gen, folder)[1].exists():
                try:
                    return self._read(gen, folder=folder)
                except EdgeclError:
                    raise
                except Exception:  # noqa: BLE001 - damaged file: a history entry may still rebuild it
                    pass
        found = self._all_entries().get(gen)
        if found is None:
            raise GenerationGone(f"generation {gen} of store {self.path} is no longer on disk (it was pruned before "
                                 f"edgecl kept every generation, or is damaged)")
        name, raw = found
        source = f"{self.history_path / name}, generation {gen}"
        try:
            entry = HistoryEntry.parse(raw, source)
        except EdgeclError as exc:
            raise GenerationGone(str(exc)) from None
        self._refuse_other_engine(entry.state.engine)
        return self._rebuild(entry, source)

    def _rebuild(self, entry: HistoryEntry, source: str) -> StoreState:
        from safetensors.numpy import load

        meta = entry.state
        files: dict = {}
        rows: dict = {ln: [] for ln in entry.widths}
        uids, contribs = [], []

        def gone(why: str) -> GenerationGone:
            return GenerationGone(f"generation {entry.generation} of store {self.path} cannot be rebuilt: {why}")

        for i, c in enumerate(meta.contributions):
            ref = entry.rows.get(c.id)
            if ref is None or not _HIST.match(ref.file):
                raise gone(f"its entry does not say where the rows of contribution {c.id[:8]}... are")
            if ref.file not in files:
                try:
                    files[ref.file] = load((self.history_path / ref.file).read_bytes())
                except Exception as exc:  # noqa: BLE001 - missing or damaged
                    raise gone(f"{ref.file} cannot be read ({one_line(exc)})") from None
            block = {ln: files[ref.file].get(f"{ref.key}.{ln}") for ln in entry.widths}
            if any(b is None or b.shape != (c.rows, entry.widths[ln]) for ln, b in block.items()) or \
                    rows_sha256(block) != ref.sha256:
                raise gone(f"the rows of contribution {c.id[:8]}... ({ref.file}) are missing or damaged")
            for ln, b in block.items():
                rows[ln].append(b.astype(np.float32))
            uids.append(np.full(c.rows, c.uid, np.int64))
            contribs.append(np.full(c.rows, i, np.int64))
        state = StoreState(engine=meta.engine, classes=list(meta.classes), policy=dict(meta.policy),
                           removed_base=list(meta.removed_base), generation=entry.generation, next_uid=meta.next_uid,
                           history=list(meta.history), contributions=list(meta.contributions),
                           removed_contributions=list(meta.removed_contributions),
                           rows={ln: (np.concatenate(v) if v else np.zeros((0, entry.widths[ln]), np.float32))
                                 for ln, v in rows.items()},
                           row_uid=np.concatenate(uids) if uids else np.zeros(0, np.int64),
                           row_contrib=np.concatenate(contribs) if contribs else np.zeros(0, np.int64))
        try:
            state.check_contributions(source)
        except EdgeclError as exc:
            raise GenerationGone(str(exc)) from None
        return state

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


@dataclass
class MergedClass:
    """What a merge did with one enrolled class name: ``contributions`` and ``rows`` in the merge,
    ``stores`` that hold at least one of them (argument order), ``joined`` (no single store held
    them all: the class was enrolled on several devices and is joined), ``duplicates``
    (contributions found again in a later store, counted once), ``dropped`` (contributions whose
    class was removed in ``removed_in``, dropped although other stores still had them)."""

    name: str
    contributions: int = 0
    rows: int = 0
    stores: list = field(default_factory=list)
    joined: bool = False
    duplicates: int = 0
    dropped: int = 0
    removed_in: list = field(default_factory=list)

    def line(self) -> str:
        n = _plural(self.contributions, "contribution")
        if not self.contributions and not self.dropped:
            text = "no enrolled rows in any store"
        elif not self.contributions:
            text = f"removed in {_join(self.removed_in)}: its {_plural(self.dropped, 'contribution')} in " \
                   f"{_join(self.stores)} dropped; not in the merge"
        else:
            text = (f"joined across {_join(self.stores)}: {n}, {self.rows} rows" if self.joined
                    else f"{n}, {self.rows} rows from {_join(self.stores)}")
            if self.duplicates:
                text += (f"; {_plural(self.duplicates, 'contribution')} already present, skipped as "
                         f"{'a duplicate' if self.duplicates == 1 else 'duplicates'}")
            if self.dropped:
                text += (f"; removed in {_join(self.removed_in)}: {_plural(self.dropped, 'contribution')} dropped, "
                         f"the class comes back with the {n} enrolled elsewhere")
        return f"merge: {self.name!r}: {text}"


@dataclass
class MergeReport:
    """What :func:`merge_states` joined: per enrolled class name (merge order) a
    :class:`MergedClass`; ``gone``: names whose every contribution was dropped as removed;
    ``removed_base``: (engine class, stores that removed it) for engine classes some other store
    still had; ``same_as``: the first store whose content the merge equals (its solved W is kept)."""

    stores: list
    classes: list = field(default_factory=list)
    gone: list = field(default_factory=list)
    removed_base: list = field(default_factory=list)
    same_as: Optional[str] = None

    @property
    def duplicates(self) -> int:
        return sum(c.duplicates for c in self.classes + self.gone)

    @property
    def joined(self) -> list:
        return [c.name for c in self.classes if c.joined]

    def lines(self) -> list:
        """One summary line, then one line per class, per class gone and per removed engine class."""
        n = sum(c.contributions for c in self.classes)
        head = (f"merge: {len(self.stores)} stores: {_plural(len(self.classes), 'enrolled class', 'enrolled classes')}"
                f" ({len(self.joined)} joined across stores), {_plural(n, 'contribution')}, "
                f"{sum(c.rows for c in self.classes)} rows; {self.duplicates} duplicate contributions skipped")
        dropped = sum(c.dropped for c in self.classes + self.gone)
        if dropped:
            head += f"; {dropped} dropped as removed"
        if self.same_as is not None:
            head += f"; the result equals {self.same_as}"
        out = [head] + [c.line() for c in self.classes + self.gone]
        out += [f"merge: engine class {name!r} removed in {_join(by)}: not in the merge"
                for name, by in self.removed_base]
        return out


def _plural(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _join(names: list) -> str:
    return ", ".join(dict.fromkeys(names))


def _content(st: StoreState) -> tuple:
    """What a state's statistics and logits depend on: its classes in order and its contributions
    (by id, with their class names)."""
    names = {c.uid: c.name for c in st.classes if c.uid is not None}
    return ([(c.name, c.base) for c in st.classes],
            frozenset((c.id, names[c.uid]) for c in st.contributions if c.uid in names))


def same_content(a: StoreState, b: StoreState) -> bool:
    """Whether two states hold the same classes, rows, weighting and removals."""
    return (a.engine == b.engine and a.policy == b.policy and _content(a) == _content(b)
            and sorted(a.removed_base) == sorted(b.removed_base)
            and set(a.removed_contributions) == set(b.removed_contributions))


def merge_states(states: list, names: list) -> tuple:
    """Merge several stores of one engine; returns (merged state, :class:`MergeReport`).

    The merge takes the union of the stores' contributions by id (the rows of one enrollment,
    :class:`~edgecl.core.formats.Contribution`), so it is idempotent (a store merged with itself,
    or with a merge that already holds it, gives the same state) and order-free; G and Q are sums
    over the union's rows, so they are exact. Contributions are grouped by their class name in
    their stores: the same name enrolled on several devices is one class (the report says it was
    joined); one contribution under two names (renamed on one device) is refused. Engine classes
    keep their statistics once (the shared baseline); renames must agree, removals are united.
    Removing an enrolled class leaves its contributions' ids as tombstones, and a merge drops
    tombstoned contributions from every store: a class removed on one device stays removed, or
    comes back with only the contributions enrolled elsewhere (the report says so). A store
    written before contribution ids has no tombstones: its removals do not reach other stores.
    Classes: engine classes by their index, then enrolled classes by their first enrollment
    time (unknown last), then name; rows by class, then contribution time, then id. When the merge
    equals one of the stores, that store's solved W is kept. ``names``: the stores' paths, for
    messages."""
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
    removed_by: dict = {}
    for s, (st, name) in enumerate(zip(states, names)):
        for b in st.removed_base:
            removed_by.setdefault(b, []).append(s)
        for c in st.classes:
            if c.base is not None and base_names.setdefault(c.base, c.name) != c.name:
                raise EdgeclError(f"cannot merge: engine class {c.base} is named {base_names[c.base]!r} in "
                                  f"one store and {c.name!r} in {name}; rename it the same way first")
    merged = StoreState(engine=first.engine, classes=[], policy=first.policy, removed_base=sorted(removed_by))
    merged.classes = [ClassEntry(base_names[b], base=b) for b in sorted(base_names) if b not in removed_by]
    taken = {c.name for c in merged.classes}
    tombstones: dict = {}
    for s, st in enumerate(states):
        for cid in st.removed_contributions:
            tombstones.setdefault(cid, []).append(s)
    # every contribution once, by id: where it was first found, which stores hold it, its class name
    found: dict = {}
    empty: set = set()  # enrolled classes without rows
    groups = [st.contribution_rows() for st in states]
    for s, (st, name) in enumerate(zip(states, names)):
        of_uid = {c.uid: c.name for c in st.classes if c.uid is not None}
        for cname in of_uid.values():
            if cname in taken:
                raise EdgeclError(f"cannot merge: enrolled class {cname!r} of {name} has the name of an engine class")
        for i, ct in enumerate(st.contributions):
            cname = of_uid.get(ct.uid)
            if cname is None:
                continue  # rows of no class (not in its statistics either)
            f = found.get(ct.id)
            if f is None:
                found[ct.id] = {"name": cname, "at": (s, i), "holders": [s], "c": ct}
                continue
            s0, i0 = f["at"]
            if f["name"] != cname:
                raise EdgeclError(f"cannot merge: one enrollment (contribution {ct.id[:8]}...) is class {f['name']!r} "
                                  f"in {names[s0]} and {cname!r} in {name}; rename it the same way first")
            if not all(np.array_equal(states[s0].rows[ln][groups[s0][i0]], st.rows[ln][groups[s][i]])
                       for ln in learners):
                raise EdgeclError(f"cannot merge: contribution {ct.id[:8]}... holds different rows in {names[s0]} "
                                  f"and {name}; one of them is damaged")
            f["holders"].append(s)
        with_rows = {ct.uid for ct in st.contributions}
        empty |= {c.name for c in st.classes if c.uid is not None and c.uid not in with_rows}
    report = MergeReport(stores=list(names))
    by_name: dict = {}
    for cid, f in found.items():
        by_name.setdefault(f["name"], []).append(cid)
    for cname in empty:
        by_name.setdefault(cname, [])

    def when(cid: str) -> float:
        t = found[cid]["c"].time
        return math.inf if t is None else t

    order = sorted(by_name, key=lambda n: (min((when(c) for c in by_name[n] if c not in tombstones),
                                               default=math.inf), n))
    rows: dict = {ln: [] for ln in learners}
    uids, contribs = [], []
    for cname in order:
        kept = sorted((c for c in by_name[cname] if c not in tombstones), key=lambda c: (when(c), c))
        dropped = [c for c in by_name[cname] if c in tombstones]
        mc = MergedClass(cname, contributions=len(kept), dropped=len(dropped),
                         removed_in=[names[s] for c in dropped for s in tombstones[c]])
        mc.stores = [names[s] for s in sorted({s for c in (kept or dropped) for s in found[c]["holders"]})]
        mc.duplicates = sum(len(found[c]["holders"]) - 1 for c in kept + dropped)
        if not kept and dropped:
            report.gone.append(mc)
            continue
        holders = [set(found[c]["holders"]) for c in kept]
        mc.joined = bool(kept) and not set.intersection(*holders)
        uid = merged.next_uid
        merged.next_uid += 1
        merged.classes.append(ClassEntry(cname, uid=uid))
        for cid in kept:
            s, i = found[cid]["at"]
            ct, sel = found[cid]["c"], groups[s][i]
            for ln in learners:
                rows[ln].append(states[s].rows[ln][sel])
            uids.append(np.full(len(sel), uid, np.int64))
            contribs.append(np.full(len(sel), len(merged.contributions), np.int64))
            merged.contributions.append(Contribution(id=cid, uid=uid, rows=len(sel), time=ct.time,
                                                     extra=dict(ct.extra)))
            mc.rows += len(sel)
        report.classes.append(mc)
    merged.rows = {ln: (np.concatenate(v) if v else np.zeros((0, first.rows[ln].shape[1]), np.float32))
                   for ln, v in rows.items()}
    merged.row_uid = np.concatenate(uids) if uids else np.zeros(0, np.int64)
    merged.row_contrib = np.concatenate(contribs) if contribs else np.zeros(0, np.int64)
    merged.removed_contributions = sorted(tombstones)
    merged.history = [{"op": "merge", "stores": [str(n) for n in names], "time": time.time()}]
    for b in merged.removed_base:
        had = [names[s] for s, st in enumerate(states) if any(c.base == b for c in st.classes)]
        if had:
            report.removed_base.append((base_names[b], [names[s] for s in removed_by[b]]))
    # a merge equal to one of the stores keeps that store's solution (no solve, the same W)
    equal = [(st, name) for st, name in zip(states, names) if _content(st) == _content(merged)]
    solved = [(st, name) for st, name in equal
              if st.W and all(w.shape[1] == len(merged.classes) for w in st.W.values())]
    if equal:
        st, report.same_as = (solved or equal)[0]
        merged.W = dict(st.W) if solved else {}
    return merged, report


def merge_stores(stores: list, out, log: Callable = print) -> tuple:
    """``edgecl merge``: read the newest generation of each store, merge them
    (:func:`merge_states`), log the report (:meth:`MergeReport.lines`) and commit the result to
    the store ``out`` (which may be one of them), unless ``out`` already holds exactly that.
    Returns (merged state, its generation)."""
    states, opened = [], {}
    for path in stores:
        record = store_record(path)
        store = ClassStore(path, record.engine, log=log)
        state = store.load()
        if state is None:
            raise EdgeclError(f"{path} holds no readable store generation")
        states.append(state)
        opened.setdefault(Path(path).resolve(), (store, state))
    merged, report = merge_states(states, [str(p) for p in stores])
    for line in report.lines():
        log(line)
    target, current = opened.get(Path(out).resolve(), (None, None))
    if target is None:
        target = ClassStore(out, merged.engine, log=log)
        current = target.load()  # refuses a store of another engine
        if current is not None:
            lost = {c.id for c in current.contributions} - {c.id for c in merged.contributions}
            if lost or not same_content(current, merged):
                log(f"merge: {out} is not among the stores merged: its generation {current.generation} "
                    f"({len(current.classes)} classes, {_plural(len(lost), 'contribution')} not in the merge) is "
                    f"replaced; list {out} among the stores to keep it")
    if current is not None and same_content(current, merged):
        log(f"merge: {out} already holds all of it; nothing to commit (generation {current.generation})")
        return current, current.generation
    gen = target.commit(merged, expect_generation=target.seen_generation)
    return merged, gen


def default_store_path(engine_dir) -> Path:
    return Path(engine_dir) / "store"
