"""The head registry and the interface every head kind implements.

A head kind is one class, registered with :func:`register_head` under its ``kind`` (the name the
bundle's learner facts and the engine manifest carry). It is built from the learner's tensors
in ``heads.safetensors`` (names without the ``<learner>.<kind>.`` prefix, see
:mod:`edgecl.core.formats`) and serves two users:

- inference over the engine's own classes: :meth:`Head.inputs` (the head's input rows from the
  learner's features) and :meth:`Head.logits` (the exporter's parity check, tests);
- the device with its store (:class:`edgecl.device.enroll.ClassHeads` drives it): after
  :meth:`Head.attach`, :meth:`Head.scores` gives logits over the store's current classes (engine
  classes renamed or removed, enrolled classes added), and :meth:`Head.add_class`,
  :meth:`Head.enroll`, :meth:`Head.remove` keep them current; :meth:`Head.solution` is what the
  store persists so that start-up needs no solve.

Adding a head kind: a module with one :class:`Head` subclass, imported in ``__init__.py``
(docs/DESIGN.md, "What each addition touches").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from edgecl.core.errors import EdgeclError

HEADS: dict = {}


def register_head(cls):
    """Class decorator: register a :class:`Head` subclass under ``cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    HEADS[cls.kind] = cls
    return cls


def head_class(kind: str, where: str = "") -> type:
    """The registered class of ``kind``; an unknown kind is one line naming ``where`` it came from."""
    try:
        return HEADS[kind]
    except KeyError:
        raise EdgeclError(f"{where + ': ' if where else ''}head kind {kind!r} is not one this edgecl runs "
                          f"({', '.join(sorted(HEADS))}); re-create it with this edgecl") from None


def load_head(kind: str, tensors: dict, where: str = "", facts=None) -> "Head":
    """A head of ``kind`` from its tensors (and its learner's manifest entry ``facts``); a missing
    tensor is one line naming ``where``."""
    cls = head_class(kind, where)
    missing = [n for n in cls.required if n not in tensors]
    if missing:
        raise EdgeclError(f"{where + ': ' if where else ''}the {kind} head lacks {', '.join(missing)}; "
                          f"re-create it with this edgecl")
    head = cls(tensors)
    head.facts = facts
    return head


@dataclass
class StoreView:
    """What a head sees of the device's store: its learner's name, the store state (classes in
    logit order, enrolled rows per learner, weighting policy; :class:`edgecl.device.store.StoreState`),
    a loader of its class statistics from the engine directory's ``stats.safetensors`` (names
    without prefix; ``{}`` when the directory has none), a loader of one of them alone, and the
    refactor period of ridge heads."""

    learner: str
    state: object
    base_stats: Callable[[], dict]
    engine_dir: str = ""
    refactor_every: int = 32
    log: Callable = print
    base_stat: Optional[Callable[[str], Optional[np.ndarray]]] = None  # one statistic, read alone (or None)

    def stat(self, name: str) -> Optional[np.ndarray]:
        """One of the learner's class statistics (``Q``, ``counts``...; None when absent), read
        without the others when the engine directory allows (G is large)."""
        if self.base_stat is not None:
            return self.base_stat(name)
        return self.base_stats().get(name)

    @property
    def rows(self) -> np.ndarray:
        """The enrolled rows of this learner (head inputs), float32 [R, width]."""
        return self.state.rows[self.learner]


class Head:
    """One learner's head (see the module docstring). Subclasses set ``kind``, ``required``
    (tensor names they need), ``enrollable``, and implement :meth:`logits_of_inputs` and
    :meth:`scores`; enrollable kinds implement the learning hooks."""

    kind = ""
    required: tuple = ()
    groups: tuple = ()  # other tensor groups of the learner the head reads, as "<group>.<name>" (SLCA: stage1)
    stats_kind = ""  # the prefix of its statistics in stats.safetensors ("": the head's kind)
    enrollable = False
    projection: Optional[np.ndarray] = None  # a fixed input map the engine graph may run (RanPAC's W_rand)
    last_update: dict = {}  # facts of the last enrollment's update that edgecl bench reports (linear: the alignment)

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self.facts = None  # the learner's entry in the engine manifest (formats.LearnerOutput), set by load_head
        self.view: Optional[StoreView] = None

    # ----------------------------------------------------------------- the engine's classes
    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @property
    def width(self) -> int:
        """The width of the head's input rows."""
        raise NotImplementedError

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """The head's input rows from the learner's features (default: the features)."""
        return np.asarray(features, np.float32)

    def logits_of_inputs(self, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Logits over the engine directory's classes."""
        return self.logits_of_inputs(self.inputs(features))

    # ----------------------------------------------------------------- with the store
    def attach(self, view: StoreView) -> None:
        """Bind the head to the store state it serves (called once, after the state is loaded)."""
        self.view = view

    def base_classes(self) -> list:
        """Per current class, its index among the engine's classes (None for enrolled ones)."""
        return [c.base for c in self.view.state.classes]

    def scores(self, h: np.ndarray) -> np.ndarray:
        """Logits over the store's current classes from head inputs ``h``."""
        raise NotImplementedError

    def refuse_enroll(self) -> None:
        raise EdgeclError(f"engine directory {self.view.engine_dir if self.view else ''} has a {self.kind!r} head: "
                          f"the device runs it and can rename or remove its classes, but cannot enroll into it; "
                          f"enroll on a RanPAC, SAFE, SimpleCIL or SLCA-family engine")

    def prepare(self) -> None:
        """One-time work before the first update (kept out of the timed update)."""

    def add_class(self) -> None:
        """A new (enrolled) class was appended to the state's classes; no rows yet."""
        if not self.enrollable:
            self.refuse_enroll()

    def enroll(self, j: int, new_rows: np.ndarray, old_rows: np.ndarray) -> None:
        """Class ``j`` (enrolled) gains ``new_rows`` (head inputs); ``old_rows`` are its rows so
        far. Called before the rows are appended to the state."""
        self.refuse_enroll()

    def remove(self, j: int, entry, rows: np.ndarray) -> None:
        """Class ``j`` (``entry``: its :class:`~edgecl.core.formats.ClassEntry`) is about to be
        removed from the state; ``rows`` are its enrolled rows (none for an engine class)."""

    def settle(self) -> None:
        """The state took the rows of an :meth:`enroll`: finish what depends on them (timed with
        the update)."""

    def refactor(self) -> None:
        """Re-derive the solution from the statistics (bounds drift; bench times it)."""

    def solution(self) -> Optional[np.ndarray]:
        """What the store keeps so that loading needs no solve (None: nothing)."""
        return None
