"""On-device enrollment: the heads of every learner from the engine directory plus the store.

Adding a class (``enroll``) takes the features of its frames (with light augmentation, see
:func:`augment_views`), turns them into each learner's head inputs (RanPAC: h = ReLU(W_rand^T f))
and hands them to the learner's head (:mod:`edgecl.device.heads`: the ridge heads update G and Q
by a rank-k update, prototype heads add sums and counts); rename and remove are label operations
(removing an enrolled class also downdates its rows out of G). :class:`ClassHeads` is
kind-agnostic: it keeps the store state (classes, enrolled rows, history) and asks each head.

Imbalance (docs/DEVICE.md, ``python -m benchmarks enroll``): the engine classes were learned
from n_ref samples each, a new class brings n_c << n_ref rows. Rows of class c enter G with
weight (n_ref/n_c)^alpha and its Q column with (n_ref/n_c)^beta. ``DEFAULT_POLICY`` (alpha = 0,
beta = 1: G unweighted, each class's target column scaled to n_ref samples, i.e. divided by its
count up to a common factor) was chosen on held-out data among alpha in {0, 0.5, 1} x beta in
{0, ..., 2}.

Calibration (docs/DEVICE.md, "Enrollment across class splits"; ``python -m benchmarks enroll_splits``):
with the weighting alone the old classes' cost of an enrollment depended on the class split it was
chosen on. ``DEFAULT_POLICY`` adds a ``margin``: each enrolled class's logits are mapped, in closed
form from the engine's statistics, onto the distribution a typical engine class's logits have over
its negatives, less ``margin`` standard deviations (:class:`edgecl.device.heads.ranpac.RanPACHead`);
``UNCALIBRATED`` is the weighting alone (stores created before keep it: a store keeps its policy).

``ALIGNED`` (alpha = beta = 1) is what SLCA's classifier alignment (Zhang et al., ICCV 2023,
Sec. 3.3: re-fit the head on features sampled from each class's Gaussian, the same number per
class) gives in expectation for a closed-form ridge head: n_ref samples from N(mu_c, Sigma_c)
add n_ref (Sigma_c + mu_c mu_c^T) to G and n_ref mu_c to Q_c, (n_ref / n_c) times the class's own
statistics. It is available (``policy=ALIGNED``) but measured 19 points lower on new classes
than the default, so it is not the default for any learner (SAFE's fast learner included).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.errors import EdgeclError
from edgecl.core.formats import ClassEntry, EngineManifest, check_output_path, unpack
from edgecl.core.labels import check_label, shown

from .engine_dir import class_names, load_heads, load_tensor_names, load_tensors, read_manifest, verify
from .heads import StoreView, load_head
from .store import ClassStore, StoreState, default_store_path

# alpha, beta: chosen on held-out data, docs/DEVICE.md "Imbalance" (python -m benchmarks enroll); margin
# (the enrolled classes' calibration, edgecl.device.heads.ranpac): chosen on held-out training images of
# three class splits, docs/DEVICE.md "Enrollment across class splits" (python -m benchmarks enroll_splits)
MARGIN = 0.375
DEFAULT_POLICY = {"alpha": 0.0, "beta": 1.0, "margin": MARGIN}
UNCALIBRATED = {"alpha": 0.0, "beta": 1.0}  # the default before the calibration (stores written then keep it)
ALIGNED = {"alpha": 1.0, "beta": 1.0}
POLICIES = {"default": DEFAULT_POLICY, "uncalibrated": UNCALIBRATED, "aligned": ALIGNED,
            "plain": {"alpha": 0.0, "beta": 0.0}}
DEFAULT_VIEWS = ("id", "flip", "crop", "cropflip")  # chosen on held-out data with the weighting (docs/DEVICE.md)
AVERAGE_VIEWS = True  # one row per frame: the mean of its views' features (k = frames, not frames x views)
REFACTOR_EVERY = 32


# ----------------------------------------------------------------------------- frames

def augment_views(frames: np.ndarray, views=DEFAULT_VIEWS) -> np.ndarray:
    """Light augmentation for enrollment: ``id``, ``flip`` (horizontal), ``crop`` (central 80 %
    scaled back), ``cropflip``. Returns [len(views) * N, H, W, 3] (views outer)."""
    import cv2

    frames = np.asarray(frames)
    _n, h, w = frames.shape[:3]
    out = []
    for v in views:
        if v == "id":
            out.append(frames)
        elif v == "flip":
            out.append(frames[:, :, ::-1])
        elif v in ("crop", "cropflip"):
            ch, cw = round(h * 0.8), round(w * 0.8)
            top, left = (h - ch) // 2, (w - cw) // 2
            crops = np.stack([cv2.resize(np.ascontiguousarray(f[top:top + ch, left:left + cw]), (w, h),
                                         interpolation=cv2.INTER_LINEAR) for f in frames])
            out.append(crops[:, :, ::-1] if v == "cropflip" else crops)
        else:
            raise EdgeclError(f"unknown enrollment view {v!r}: use id, flip, crop or cropflip")
    return np.ascontiguousarray(np.concatenate(out))


def view_rows(features: np.ndarray, n_views: int, average: bool = AVERAGE_VIEWS) -> np.ndarray:
    """Rows for enrollment from the head inputs of :func:`augment_views` output ([views * N, w]):
    all of them, or (``average``) the mean over each frame's views (the update's rank k is then
    the number of frames; docs/DEVICE.md)."""
    features = np.asarray(features, np.float32)
    if not average or n_views == 1:
        return features
    return features.reshape(n_views, -1, features.shape[1]).mean(0)


def usable_frames(frames: list, what: str) -> np.ndarray:
    """Keep frames that carry an image (not blank: pixel std >= 3); refuse when none is left."""
    if len(frames) == 0:
        raise EdgeclError(f"no usable frames for enrollment: {what} gave no frames; check the path/camera")
    keep = [f for f in frames if float(np.asarray(f).std()) >= 3.0]
    if not keep:
        raise EdgeclError(f"no usable frames for enrollment: all {len(frames)} frames from {what} are blank "
                          f"(uniform colour); point the camera at the object")
    return np.stack(keep)


def imprint_columns(W: np.ndarray, H_by_class: list) -> np.ndarray:
    """Prototype imprinting (Qi et al., CVPR 2018; Coral's imprinting engine): each new class's
    weight column is its normalised mean embedding scaled to the mean norm of the existing
    columns. Used as the baseline in ``python -m benchmarks enroll``."""
    scale = float(np.linalg.norm(W, axis=0).mean())
    cols = []
    for H in H_by_class:
        m = H.mean(0)
        cols.append(scale * m / max(float(np.linalg.norm(m)), 1e-12))
    return np.concatenate([W, np.stack(cols, 1)], axis=1)


# ----------------------------------------------------------------------------- heads

class ClassHeads:
    """All learners' heads of an engine directory with its store; ``logits(features)`` for the
    loop, ``enroll`` / ``remove`` / ``rename`` + ``commit`` for learning. Kind-specific work is
    the heads' own (:class:`edgecl.device.heads.Head`)."""

    def __init__(self, engine_dir, manifest: EngineManifest, store_path=None, policy: dict | None = None,
                 refactor_every: int = REFACTOR_EVERY, log: Callable = print):
        self.engine_dir, self.manifest, self.log = Path(engine_dir), manifest, log
        self.refactor_every = refactor_every
        self.heads = load_heads(engine_dir, manifest)
        store_path = Path(store_path) if store_path else default_store_path(engine_dir)
        check_output_path(store_path, "--store", store_ok=True, parent_must_exist=False)
        self.store = ClassStore(store_path, manifest.identity(), log)
        self._policy = policy
        self._stats = None  # the engine's class statistics, read on first use (base_stats)
        self._small_stats: dict = {}  # single statistics read alone (base_stat)
        state = self.store.load()
        if state is None:
            state = self.initial_state()
        elif policy is not None and dict(policy) != state.policy:
            raise EdgeclError(f"store {self.store.path} uses the weighting {state.policy}; the requested {policy} "
                              f"would mix two weightings (start a new --store)")
        self.use_state(state)

    def initial_state(self) -> StoreState:
        """Generation 0: the engine directory's classes, nothing enrolled (the store's weighting)."""
        policy = self.state.policy if getattr(self, "state", None) is not None else (self._policy or DEFAULT_POLICY)
        return StoreState.initial(self.store.engine, class_names(self.engine_dir, self.manifest), policy,
                                  {ln: h.width for ln, h in self.heads.items()})

    def use_state(self, state: StoreState) -> None:
        """Serve ``state`` (not committed until :meth:`commit`): fresh heads from the engine's tensors bound to it."""
        self.state = state
        self.heads = {ln: load_head(h.kind, h.tensors, str(self.engine_dir), h.facts) for ln, h in self.heads.items()}
        for ln, head in self.heads.items():
            head.attach(StoreView(ln, state, lambda ln=ln: self.base_stats(ln), str(self.engine_dir),
                                  self.refactor_every, self.log, lambda name, ln=ln: self.base_stat(ln, name)))

    def reload(self) -> None:
        """Drop what was not committed and serve the store's newest generation (another process may
        have committed since this one loaded)."""
        self.use_state(self.store.load() or self.initial_state())

    def history(self, limit: int | None = None) -> list:
        """The store's generations newest first (:meth:`ClassStore.history`), with generation 0 (the
        engine directory) last when the list reaches it; ``current`` marks the one served."""
        items = self.store.history(limit)
        if limit is None or len(items) < limit:
            items.append({"generation": 0, "created": None, "ops": [{"op": "engine"}],
                          "classes": len(class_names(self.engine_dir, self.manifest)), "enrolled": [], "rows": 0,
                          "available": True, "reason": None})
        for it in items:
            it["current"] = it["generation"] == self.state.generation
        return items

    def rollback(self, generation: int, commit: bool = True):
        """Commit generation ``generation``'s state again as a new generation (all-or-nothing; the
        generations in between stay in the history), with the history entry ``{"op": "rollback",
        "to": generation}``; returns the new generation's number (``commit=False``: serve that
        state, the caller commits). Refused for the generation served and for one whose state is
        not on disk (:meth:`ClassStore.state_at`). The state comes back exactly, tombstones
        included: contributions it does not hold are not tombstoned, so merging with a store that
        still holds them brings them back."""
        if isinstance(generation, bool) or not isinstance(generation, int):
            raise EdgeclError(f"rollback: the generation must be an integer, got {generation!r}")
        if generation == self.state.generation:
            raise EdgeclError(f"rollback: generation {generation} is the current one; nothing to roll back")
        target = self.store.state_at(generation) or self.initial_state()
        target.history = list(self.state.history) + [{"op": "rollback", "to": generation, "time": time.time()}]
        target.next_uid = max(target.next_uid, self.state.next_uid)
        target.generation = generation
        self.use_state(target)
        return self.commit() if commit else None

    def state_key(self) -> tuple:
        """Changes whenever the classes or rows served change (enroll, rename, remove, reload, rollback)."""
        st = self.state
        return (id(st), st.generation, len(st.history), len(st.row_uid), tuple(st.names))

    def base_classes(self) -> list:
        """Per current class, its index among the engine's classes (None for enrolled ones)."""
        return [c.base for c in self.state.classes]

    @property
    def learners(self) -> dict:
        """{learner: head kind}."""
        return {ln: h.kind for ln, h in self.heads.items()}

    @property
    def classes(self) -> list:
        return self.state.names

    @property
    def projections(self) -> dict:
        """{learner: fixed input map} the engine graph may run for the heads (RanPAC's W_rand)."""
        return {ln: h.projection for ln, h in self.heads.items() if h.projection is not None}

    def base_stats(self, ln: str) -> dict:
        """The learner's class statistics in the engine directory (names without prefix)."""
        if self._stats is None:
            self._stats = load_tensors(self.engine_dir, self.manifest, "stats")
        head = self.heads[ln]
        return unpack(self._stats[ln], head.stats_kind or head.kind)

    def base_stat(self, ln: str, name: str):
        """One of the learner's class statistics (None when absent), read alone unless all are loaded:
        serving a store's enrolled classes needs Q and the counts, not G."""
        if self._stats is not None:
            return self.base_stats(ln).get(name)
        head = self.heads[ln]
        key = f"{ln}.{head.stats_kind or head.kind}.{name}"
        if key not in self._small_stats:
            self._small_stats[key] = load_tensor_names(self.engine_dir, self.manifest, "stats", [key]).get(key)
        return self._small_stats[key]

    # ----------------------------------------------------------------- inference
    def head_inputs(self, features: dict) -> dict:
        """{learner: rows in its head's input space}: taken from the engine when it ran the
        head's projection (``"<learner>:h"``), else :meth:`Head.inputs` of the features."""
        out = {}
        for ln, head in self.heads.items():
            h = features.get(f"{ln}:h")
            out[ln] = np.asarray(h, np.float32) if h is not None else head.inputs(features[ln])
        return out

    def logits(self, features: dict) -> dict:
        inputs = self.head_inputs(features)
        return {ln: head.scores(inputs[ln]) for ln, head in self.heads.items()}

    # ----------------------------------------------------------------- learning
    def check_enrollable(self) -> None:
        """Refuse, before any work, an engine whose heads cannot take a new class."""
        for head in self.heads.values():
            if not head.enrollable:
                head.refuse_enroll()

    def prepare(self) -> None:
        """The heads' one-time preparation (loading statistics, first factorisation)."""
        for head in self.heads.values():
            head.prepare()

    def enroll(self, name: str, rows: dict) -> dict:
        """Add ``rows`` ({learner: [k, width]} in the heads' input space, :meth:`head_inputs`) as
        class ``name`` (new, or more rows for an enrolled class). Returns ``update_ms`` (the
        update of all learners' heads)."""
        name = check_label(name, "--name")
        self.check_enrollable()
        rows = {ln: np.asarray(rows[ln], np.float32) for ln in self.heads}
        k = {len(v) for v in rows.values()}
        if len(k) != 1 or 0 in k:
            raise EdgeclError("no usable frames for enrollment (no features)")
        k = k.pop()
        st = self.state
        j = st.index(name)
        if j >= 0 and st.classes[j].base is not None:
            raise EdgeclError(f"{name!r} is a class of the engine; enroll under another name (or --rename it first)")
        self.prepare()  # timed separately
        start = time.perf_counter()
        if j < 0:
            st.classes.append(ClassEntry(name, uid=st.next_uid))
            st.next_uid += 1
            j = len(st.classes) - 1
            for head in self.heads.values():
                head.add_class()
        uid = st.classes[j].uid
        old = st.rows_of(uid)
        for ln, head in self.heads.items():
            head.enroll(j, rows[ln], st.rows[ln][old])
        update_ms = 1000 * (time.perf_counter() - start)
        st.add_contribution(uid, rows)  # one contribution with a fresh random id (merge unites them by id)
        start = time.perf_counter()
        for head in self.heads.values():
            head.settle()  # what depends on the rows in the state (the enrolled classes' calibration)
        update_ms += 1000 * (time.perf_counter() - start)
        st.history.append({"op": "enroll", "name": name, "rows": int(k), "time": time.time()})
        return {"update_ms": update_ms, "rows": int(k), "classes": len(st.classes)}

    def remove(self, name: str) -> None:
        st = self.state
        j = st.index(name)
        if j < 0:
            raise EdgeclError(f"--remove {name!r}: no such class (known: {', '.join(st.names[:5])}, ...)")
        c = st.classes[j]
        sel = st.rows_of(c.uid) if c.uid is not None else np.zeros(0, np.int64)
        for ln, head in self.heads.items():
            head.remove(j, c, st.rows[ln][sel])
        if c.base is not None:
            st.removed_base.append(c.base)
        else:
            st.drop_class_rows(c.uid)  # its contributions' ids stay as tombstones, so a merge drops them too
        st.classes.pop(j)
        st.history.append({"op": "remove", "name": name, "time": time.time()})

    def rename(self, old: str, new: str) -> None:
        st = self.state
        j = st.index(old)
        if j < 0:
            raise EdgeclError(f"--rename {shown(old)!r}: no such class")
        new = check_label(new, f"--rename {shown(old)}=...")
        if st.index(new) >= 0:
            raise EdgeclError(f"--rename {shown(old)}={new}: {new!r} is already a class")
        st.classes[j].name = new
        st.history.append({"op": "rename", "old": old, "new": new, "time": time.time()})

    def commit(self) -> int:
        """Persist the state as a new store generation (all-or-nothing); returns its number."""
        self.state.W = {ln: sol for ln, h in self.heads.items() if (sol := h.solution()) is not None}
        return self.store.commit(self.state, expect_generation=self.store.seen_generation)


def solve_store(engine_dir, store, log: Callable = print) -> int:
    """Solve the heads of ``engine_dir`` over the statistics in ``store`` (for example a merged
    store) and commit the solution, so the device starts without a solve; returns the generation."""
    manifest = read_manifest(engine_dir)
    verify(engine_dir, manifest)
    return ClassHeads(engine_dir, manifest, store, log=log).commit()
