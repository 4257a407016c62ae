"""On-device enrollment: the heads of every learner from the engine directory plus the store.

Adding a class (``enroll``) takes the features of its frames (with light augmentation, see
:func:`augment_views`), projects them (h = ReLU(W_rand^T f)) and updates each learner's ridge
head by a rank-k update of G and Q (:class:`edgecl.device.ranpac.RidgeHead`); rename and
remove are label operations (removing an enrolled class also downdates its rows out of G).

Imbalance (docs/DEVICE.md, ``benchmarks/enroll_bench.py``): the engine classes were learned
from n_ref samples each (recorded counts, else :func:`~edgecl.device.ranpac.estimate_class_counts`),
a new class brings n_c << n_ref rows. Rows of class c enter G with weight (n_ref/n_c)^alpha
and its Q column with (n_ref/n_c)^beta. ``DEFAULT_POLICY`` (alpha = 0, beta = 1: G unweighted,
each class's target column scaled to n_ref samples, i.e. divided by its count up to a common
factor) was chosen on held-out data among alpha in {0, 0.5, 1} x beta in {0, ..., 2}.

``ALIGNED`` (alpha = beta = 1) is what SLCA's classifier alignment (Zhang et al., ICCV 2023,
Sec. 3.3: re-fit the head on features sampled from each class's Gaussian, the same number per
class) gives in expectation for a closed-form ridge head: n_ref samples from N(mu_c, Sigma_c)
add n_ref (Sigma_c + mu_c mu_c^T) to G and n_ref mu_c to Q_c, (n_ref / n_c) times the class's own
statistics. It is available (``policy=ALIGNED``) but measured 19 points lower on new classes
than the default, so it is not the default for any learner (SAFE's fast learner included).

SimpleCIL (prototype) heads need no solve: sums and counts of the enrolled rows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgecl.core.errors import EdgeclError

from .engine_dir import class_names, load_tensors
from .heads import project, prototype_logits
from .ranpac import RidgeHead, balance_weights, estimate_class_counts
from .store import (
    ClassStore,
    StoreState,
    default_store_path,
    engine_identity,
    ensure_not_bound,
)

# chosen on held-out data, see docs/DEVICE.md "Imbalance" (benchmarks/enroll_bench.py)
DEFAULT_POLICY = {"alpha": 0.0, "beta": 1.0}
ALIGNED = {"alpha": 1.0, "beta": 1.0}
POLICIES = {"default": DEFAULT_POLICY, "aligned": ALIGNED, "plain": {"alpha": 0.0, "beta": 0.0}}
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
    columns. Used as the baseline in ``benchmarks/enroll_bench.py``."""
    scale = float(np.linalg.norm(W, axis=0).mean())
    cols = []
    for H in H_by_class:
        m = H.mean(0)
        cols.append(scale * m / max(float(np.linalg.norm(m)), 1e-12))
    return np.concatenate([W, np.stack(cols, 1)], axis=1)


# ----------------------------------------------------------------------------- heads

class ClassHeads:
    """All learners' heads of an engine directory with its store; ``logits(features)`` for the
    loop, ``enroll`` / ``remove`` / ``rename`` + ``commit`` for learning."""

    def __init__(self, engine_dir, manifest: dict, store_path=None, policy: dict | None = None,
                 refactor_every: int = REFACTOR_EVERY, log: Callable = print):
        self.engine_dir, self.manifest, self.log = Path(engine_dir), manifest, log
        self.refactor_every = refactor_every
        self.learners = {ln: info["head"] for ln, info in manifest["learners"].items()}
        unsupported = {ln: k for ln, k in self.learners.items() if k not in ("ranpac", "prototypes", "linear")}
        if unsupported:
            ln, kind = next(iter(unsupported.items()))
            raise EdgeclError(f"engine directory {engine_dir}: learner {ln!r} has a {kind!r} head, which this edgecl "
                              f"cannot run; re-export the bundle with this edgecl")
        self.tensors = load_tensors(engine_dir, manifest, "heads")
        self.W_rand = {ln: (None if t.get("ranpac.W_rand") is None else np.asarray(t["ranpac.W_rand"], np.float32))
                       for ln, t in self.tensors.items()}
        store_path = Path(store_path) if store_path else default_store_path(engine_dir)
        ensure_not_bound(engine_dir, store_path, manifest)
        self.store = ClassStore(store_path, engine_identity(manifest), log)
        state = self.store.load()
        if state is None:
            state = StoreState(engine=self.store.engine, policy=dict(policy or DEFAULT_POLICY),
                               classes=[{"name": n, "base": i, "uid": None}
                                        for i, n in enumerate(class_names(engine_dir, manifest))])
            state.rows = {ln: np.zeros((0, self._dim(ln)), np.float32) for ln in self.learners}
        elif policy is not None and dict(policy) != state.policy:
            raise EdgeclError(f"store {self.store.path} uses the weighting {state.policy}; the requested {policy} "
                              f"would mix two weightings (start a new --store)")
        self.state = state
        self._ridge: dict = {}
        self._n_ref: dict = {}
        self._proto_cache: dict = {}
        self.W = {ln: self._initial_W(ln) for ln in self.learners if self.learners[ln] == "ranpac"}

    # ----------------------------------------------------------------- set-up
    def _dim(self, ln: str) -> int:
        """Width of the learner's rows (its head's input: M for RanPAC, else the feature size)."""
        t = self.tensors[ln]
        if t.get("ranpac.W_rand") is not None:
            return int(t["ranpac.W_rand"].shape[1])
        if "ranpac.W" in t:
            return int(t["ranpac.W"].shape[0])
        if "linear.weight" in t:
            return int(t["linear.weight"].shape[1])
        return int(t["prototypes.sums"].shape[1])

    @property
    def classes(self) -> list:
        return self.state.names

    def policy_for(self, ln: str) -> dict:
        return self.state.policy

    def _unchanged(self) -> bool:
        return not self.state.removed_base and len(self.state.row_uid) == 0 and all(
            c["base"] == i for i, c in enumerate(self.state.classes))

    def _initial_W(self, ln: str) -> np.ndarray:
        if ln in self.state.W and self.state.W[ln].shape[1] == len(self.state.classes):
            return np.asarray(self.state.W[ln], np.float32)
        if self._unchanged():
            return np.asarray(self.tensors[ln]["ranpac.W"], np.float32)
        self.log(f"solving the {ln} head once from the statistics (the store has no solution cached)")
        return self.ridge(ln).W.astype(np.float32)

    def base_statistics(self, ln: str) -> tuple:
        """(G, Q, lambda, per-class counts) of the engine directory (generation 0)."""
        from safetensors import safe_open

        f = self.engine_dir / "stats.safetensors"
        if not f.is_file() or "stats.safetensors" not in self.manifest.get("files", {}):
            raise EdgeclError(f"engine directory {self.engine_dir} has no stats.safetensors (class statistics); "
                              f"enrollment needs them: re-export from a RanPAC/SAFE bundle")
        with safe_open(str(f), "np") as s:
            keys = set(s.keys())
            G = s.get_tensor(f"{ln}.ranpac.G").astype(np.float64)
            Q = s.get_tensor(f"{ln}.ranpac.Q").astype(np.float64)
            counts = s.get_tensor(f"{ln}.ranpac.counts") if f"{ln}.ranpac.counts" in keys else None
        lam = float(np.asarray(self.tensors[ln]["ranpac.lambda"]).reshape(-1)[0])
        if counts is None:
            counts = estimate_class_counts(G, Q, G.shape[0]) if self.W_rand[ln] is not None else np.ones(Q.shape[1])
        return G, Q, lam, np.asarray(counts, np.float64)

    def n_ref(self, ln: str) -> float:
        if ln not in self._n_ref:
            self.ridge(ln)
        return self._n_ref[ln]

    def _row_weights(self, ln: str, n: int) -> tuple:
        pol = self.policy_for(ln)
        n_ref = self.n_ref(ln)
        return float(balance_weights(n, n_ref, pol["alpha"])), float(balance_weights(n, n_ref, pol["beta"]))

    def ridge(self, ln: str) -> RidgeHead:
        """The learner's :class:`RidgeHead` over engine statistics + enrolled rows (built on first use)."""
        if ln in self._ridge:
            return self._ridge[ln]
        G, Q_base, lam, counts = self.base_statistics(ln)
        self._n_ref[ln] = float(np.median(counts)) if len(counts) else 1.0
        st = self.state
        Q = np.zeros((G.shape[0], len(st.classes)))
        n_by_uid = st.counts()
        for j, c in enumerate(st.classes):
            if c["base"] is not None:
                Q[:, j] = Q_base[:, c["base"]]
        for j, c in enumerate(st.classes):
            if c["uid"] is not None:
                sel = st.rows_of(c["uid"])
                H = st.rows[ln][sel].astype(np.float64)
                wg, wq = self._row_weights(ln, n_by_uid.get(c["uid"], 0))
                G += wg * (H.T @ H)
                Q[:, j] = wq * H.sum(0)
        W = st.W.get(ln)
        ok = W is not None and W.shape == Q.shape
        self._ridge[ln] = RidgeHead(G, Q, lam, W=W if ok else None, refactor_every=self.refactor_every)
        return self._ridge[ln]

    # ----------------------------------------------------------------- inference
    def head_inputs(self, features: dict) -> dict:
        """{learner: rows in its head's input space}: h = ReLU(f W_rand) for RanPAC (taken from
        the engine when the projection runs there, ``"<learner>:h"``), f for prototypes."""
        out = {}
        for ln in self.learners:
            h = features.get(f"{ln}:h")
            out[ln] = np.asarray(h, np.float32) if h is not None else project(features[ln], self.W_rand[ln])
        return out

    def logits(self, features: dict) -> dict:
        out = {}
        inputs = self.head_inputs(features)
        for ln, kind in self.learners.items():
            if kind == "ranpac":
                out[ln] = inputs[ln] @ self.W[ln]
            elif kind == "linear":
                weight, bias = self._linear(ln)
                out[ln] = inputs[ln] @ weight.T + bias
            else:
                sums, counts = self._prototypes(ln)
                out[ln] = prototype_logits(inputs[ln], sums, counts)
        return out

    def _linear(self, ln: str) -> tuple:
        """(weight [C, d], bias [C]) of the current classes (engine classes only: a linear head
        cannot enroll yet, but its classes can be renamed and removed)."""
        t = self.tensors[ln]
        base = [c["base"] for c in self.state.classes]
        bias = t.get("linear.bias")
        return (np.asarray(t["linear.weight"], np.float32)[base],
                np.zeros(len(base), np.float32) if bias is None else np.asarray(bias, np.float32)[base])

    def _prototypes(self, ln: str) -> tuple:
        key = (ln, len(self.state.row_uid), tuple(self.state.names))
        if key not in self._proto_cache:
            self._proto_cache = {key: self._prototype_tensors(ln)}
        return self._proto_cache[key]

    def _prototype_tensors(self, ln: str) -> tuple:
        t, st = self.tensors[ln], self.state
        sums, counts = [], []
        for c in st.classes:
            if c["base"] is not None:
                sums.append(np.asarray(t["prototypes.sums"][c["base"]], np.float64))
                counts.append(float(t["prototypes.counts"][c["base"]]))
            else:
                sel = st.rows_of(c["uid"])
                sums.append(st.rows[ln][sel].astype(np.float64).sum(0))
                counts.append(float(len(sel)))
        return np.stack(sums), np.asarray(counts)

    # ----------------------------------------------------------------- learning
    def check_enrollable(self) -> None:
        """Refuse, before any work, an engine whose heads cannot take a new class."""
        if "linear" in self.learners.values():
            raise EdgeclError(f"engine directory {self.engine_dir} has a 'linear' head (SLCA / SLCA++): the device "
                              f"runs it and can rename or remove its classes, but cannot enroll into it yet; "
                              f"enroll on a RanPAC, SAFE or SimpleCIL engine")

    def enroll(self, name: str, rows: dict) -> dict:
        """Add ``rows`` ({learner: [k, width]} in the heads' input space, :meth:`head_inputs`) as
        class ``name`` (new, or more rows for an enrolled class). Returns ``update_ms`` (the
        rank-k update of all learners)."""
        features = rows
        name = str(name).strip()
        if not name:
            raise EdgeclError("--name is empty; give the class a label")
        features = {ln: features[ln] for ln in self.learners}
        k = {len(np.asarray(v)) for v in features.values()}
        if len(k) != 1 or 0 in k:
            raise EdgeclError("no usable frames for enrollment (no features)")
        k = k.pop()
        st = self.state
        self.check_enrollable()
        j = st.index(name)
        if j >= 0 and st.classes[j]["base"] is not None:
            raise EdgeclError(f"{name!r} is a class of the engine; enroll under another name (or --rename it first)")
        for ln in self.learners:  # build and factor (timed separately) before the update
            if self.learners[ln] == "ranpac":
                self.ridge(ln).prepare()
        start = time.perf_counter()
        if j < 0:
            uid = st.next_uid
            st.next_uid += 1
            st.classes.append({"name": name, "base": None, "uid": uid})
            j = len(st.classes) - 1
            for ln in self._ridge:
                self._ridge[ln].add_classes(1)
        uid = st.classes[j]["uid"]
        old = st.rows_of(uid)
        for ln, kind in self.learners.items():
            if kind != "ranpac":
                continue
            F_new = np.asarray(features[ln], np.float32)
            wg0, wq0 = self._row_weights(ln, len(old)) if len(old) else (0.0, 0.0)
            wg1, wq1 = self._row_weights(ln, len(old) + k)
            parts = [(F_new, wg1, wq1)]
            if len(old) and (wg1 != wg0 or wq1 != wq0):  # reweight the class's earlier rows
                parts.append((st.rows[ln][old], wg1 - wg0, wq1 - wq0))
            F = np.concatenate([p[0] for p in parts])
            d = np.concatenate([np.full(len(p[0]), p[1]) for p in parts])
            E = np.zeros((len(F), len(st.classes)))
            E[:, j] = np.concatenate([np.full(len(p[0]), p[2]) for p in parts])
            rh = self._ridge[ln]
            rh.update(F, d, E)
            self.W[ln] = rh.W.astype(np.float32)
        update_ms = 1000 * (time.perf_counter() - start)
        for ln in self.learners:
            st.rows[ln] = np.concatenate([st.rows[ln], np.asarray(features[ln], np.float32)])
        st.row_uid = np.concatenate([st.row_uid, np.full(k, uid, np.int64)])
        st.history.append({"op": "enroll", "name": name, "rows": int(k), "time": time.time()})
        return {"update_ms": update_ms, "rows": int(k), "classes": len(st.classes)}

    def remove(self, name: str) -> None:
        st = self.state
        j = st.index(name)
        if j < 0:
            raise EdgeclError(f"--remove {name!r}: no such class (known: {', '.join(st.names[:5])}, ...)")
        c = st.classes[j]
        for ln in self.learners:
            if self.learners[ln] == "ranpac":
                self.ridge(ln).drop_classes([j])
        if c["base"] is not None:
            st.removed_base.append(c["base"])  # its samples stay in G (as data of no remaining class)
        else:
            sel = st.rows_of(c["uid"])
            for ln, rh in self._ridge.items():
                wg, _ = self._row_weights(ln, len(sel))
                rh.update(st.rows[ln][sel], np.full(len(sel), -wg),
                          np.zeros((len(sel), rh.num_classes)))
            keep = st.row_uid != c["uid"]
            st.rows = {ln: r[keep] for ln, r in st.rows.items()}
            st.row_uid = st.row_uid[keep]
        st.classes.pop(j)
        for ln, rh in self._ridge.items():
            self.W[ln] = rh.W.astype(np.float32)
        st.history.append({"op": "remove", "name": name, "time": time.time()})

    def rename(self, old: str, new: str) -> None:
        st = self.state
        j = st.index(old)
        if j < 0:
            raise EdgeclError(f"--rename {old!r}: no such class")
        if st.index(new) >= 0:
            raise EdgeclError(f"--rename {old}={new}: {new!r} is already a class")
        st.classes[j]["name"] = new
        st.history.append({"op": "rename", "old": old, "new": new, "time": time.time()})

    def commit(self) -> int:
        """Persist the state as a new store generation (all-or-nothing); returns its number."""
        self.state.W = {ln: self.W[ln] for ln in self.W}
        return self.store.commit(self.state, expect_generation=self.store.seen_generation)
