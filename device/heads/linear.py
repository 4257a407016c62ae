"""The linear head (SLCA / SLCA++: the aligned per-session heads, concatenated) on the device:
logits = f @ weight.T + bias.

Tensors: ``weight`` (C x d), ``bias`` (C), ``blocks`` (classes per session) and the stage-1 heads
the training's alignments start from (``stage1.weight``, ``stage1.bias``); each class's Gaussian
(``classstats.*`` in ``stats.safetensors``: :class:`edgecl.core.classstats.ClassStats` in the
bundle's export form); the alignment it was trained with (the manifest's learner ``alignment``).

Enrollment re-runs SLCA's classifier alignment (Sec. 4.2) as training runs it after a session
(:mod:`edgecl.core.alignment`, numpy): the enrolled classes' statistics come from their rows (the
store keeps the rows, so the statistics are exact and follow every commit, rename, removal, merge
and rollback), and the enrolled classes form one more session. The alignment starts from the
stage-1 heads of the engine's classes, draws ``samples_per_class`` features per class per epoch
batch by batch, and runs the configured SGD. Three choices, made on held-out training images
(docs/DEVICE.md, "Enrolling into an SLCA-family engine"): the device trains no stage 1, so an
enrolled class starts from its imprinted row (``init``; the authors' new head, N(0, 0.02^2), is
the other option); with a few frames its scatter is narrow, so it pools its nearest engine
class's scatter (``borrow``); its logits are offset by ``offset`` standard deviations of the
engine's logits. Removing a class drops its row (the other logits do not change); renaming is a
label.
"""

from __future__ import annotations

import numpy as np

from edgecl.core.alignment import align, draw_epochs, head_scales, sessions_of
from edgecl.core.classstats import ClassStats, ClassStatsError
from edgecl.core.errors import EdgeclError

from .base import Head, register_head

INIT_STD = 0.02  # "normal": an enrolled class's initial row (the authors' trunc_normal(std=0.02) of a new head)
INITS = ("normal", "imprint")  # how an enrolled class's row starts the alignment (the device trains no stage 1)
# the enrolled classes' logit offset, in standard deviations of the engine's logits (LinearHead.logit_sd):
# chosen on held-out training images (python -m benchmarks enroll_linear, docs/DEVICE.md)
OFFSET = 1.375


@register_head
class LinearHead(Head):
    kind = "linear"
    required = ("weight",)
    groups = ("stage1",)
    stats_kind = "classstats"
    # chosen on held-out training images (python -m benchmarks enroll_linear, docs/DEVICE.md): an enrolled
    # class starts from its imprinted row and pools its nearest engine class's scatter
    init = "imprint"  # one of INITS
    borrow = True  # an enrolled class pools the scatter of its nearest engine class (ClassStats.borrow_scatter)
    offset = OFFSET

    def __init__(self, tensors: dict):
        super().__init__(tensors)
        self.weight = np.asarray(tensors["weight"], np.float32)
        bias = tensors.get("bias")
        self.bias = np.zeros(len(self.weight), np.float32) if bias is None else np.asarray(bias, np.float32)
        blocks = tensors.get("blocks")
        self.blocks = [self.num_classes] if blocks is None else [int(b) for b in np.asarray(blocks).reshape(-1)]
        self.current = (self.weight, self.bias)
        self._stats = None
        self._logit_sd = None
        self._enrolled_cols = None  # computed from the store state by _enrolled_columns

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    @property
    def spec(self):
        return getattr(self.facts, "alignment", None)

    @property
    def enrollable(self) -> bool:
        return self.spec is not None and "stage1.weight" in self.tensors

    def refuse_enroll(self) -> None:
        where = self.view.engine_dir if self.view else ""
        raise EdgeclError(f"engine directory {where} has a linear head without the classifier alignment it was "
                          f"trained with (exported by an older edgecl): the device runs it and can rename or "
                          f"remove its classes, but cannot enroll into it; export its bundle again with this edgecl")

    def logits_of_inputs(self, h: np.ndarray) -> np.ndarray:
        return np.asarray(h, np.float32) @ self.weight.T + self.bias

    # ----------------------------------------------------------------- with the store
    def attach(self, view) -> None:
        super().attach(view)
        st = view.state
        if all(c.base is not None for c in st.classes):  # the engine's classes (renamed, removed): their rows
            base = [c.base for c in st.classes]
            self.current = (self.weight[base], self.bias[base])
            return
        cached = st.W.get(view.learner)
        if cached is not None and cached.shape == (self.width + 1, len(st.classes)):
            self.current = (np.ascontiguousarray(cached[:-1].T, np.float32), np.asarray(cached[-1], np.float32))
        else:
            view.log(f"aligning the {view.learner} head once from the class statistics (the store has no "
                     f"solution cached)")
            self.realign()

    def scores(self, h: np.ndarray) -> np.ndarray:
        W, b = self.current
        out = np.asarray(h, np.float32) @ W.T + b
        cols = self._enrolled_columns()
        if self.offset and len(cols):  # the enrolled classes, learned from a few frames, against the engine's
            out[..., cols] += np.float32(self.offset * self.logit_sd())
        return out

    def _enrolled_columns(self) -> np.ndarray:
        """The enrolled classes' logit columns (kept until the classes change: enroll, remove)."""
        if self._enrolled_cols is None:
            self._enrolled_cols = np.asarray([j for j, c in enumerate(self.view.state.classes) if c.base is None],
                                             np.int64)
        return self._enrolled_cols

    def logit_sd(self) -> float:
        """The standard deviation of the engine head's logits over draws from its classes' Gaussians
        (8 per class, seeded): the unit of the enrolled classes' offset (computed once)."""
        if self._logit_sd is None:
            base = self.base_statistics()
            rng = np.random.default_rng(self.spec.seed if self.spec else 0)
            x = base.draw(np.repeat(base.seen(), 8), rng)
            self._logit_sd = float(np.std(x @ self.weight.T + self.bias))
        return self._logit_sd

    def base_statistics(self) -> ClassStats:
        """The engine classes' Gaussians (read once)."""
        if self._stats is None:
            state = self.view.base_stats()
            if not state:
                raise EdgeclError(f"engine directory {self.view.engine_dir} has no class statistics for learner "
                                  f"{self.view.learner!r} (stats.safetensors: classstats.*); enrollment needs "
                                  f"them: re-export from an SLCA-family bundle")
            try:
                self._stats = ClassStats.from_state({k: np.asarray(v) for k, v in state.items()})
            except ClassStatsError as exc:
                raise EdgeclError(f"engine directory {self.view.engine_dir}: {exc}; re-export it") from None
            if self._stats.num_classes != self.num_classes or self._stats.dim != self.width:
                raise EdgeclError(f"engine directory {self.view.engine_dir}: statistics of "
                                  f"{self._stats.num_classes} classes x {self._stats.dim} for a head of "
                                  f"{self.num_classes} x {self.width}; re-export it")
        return self._stats

    def prepare(self) -> None:
        self.base_statistics()

    def enroll(self, j: int, new_rows: np.ndarray, old_rows: np.ndarray) -> None:
        """Nothing yet: the alignment runs in :meth:`settle`, once the rows are in the state."""

    def settle(self) -> None:
        self._enrolled_cols = None
        self.realign()

    def remove(self, j: int, entry, rows: np.ndarray) -> None:
        W, b = self.current
        self.current = (np.delete(W, j, axis=0), np.delete(b, j))
        self._enrolled_cols = None  # the state drops class j next

    def realign(self) -> None:
        """Classifier alignment over the store's current classes (see the module docstring)."""
        st, spec = self.view.state, self.spec
        if spec is None or "stage1.weight" not in self.tensors:
            self.refuse_enroll()
        base = self.base_statistics()
        stage1_w = np.asarray(self.tensors["stage1.weight"], np.float32)
        stage1_b = np.asarray(self.tensors.get("stage1.bias", np.zeros(len(stage1_w))), np.float32)
        engine_sessions = sessions_of(self.blocks)
        device_session = len(self.blocks)  # the enrolled classes: one more session
        rng = np.random.default_rng([spec.seed, len(st.classes), len(st.row_uid)])
        enrolled = [c for c in st.classes if c.base is None]
        # the engine's classes, then the enrolled ones as new classes (their scatter joins a shared form's pool)
        stats = base.copy() if enrolled else base
        classes, sessions, w0, b0 = [], [], [], []
        engine = [c.base for c in st.classes if c.base is not None]
        for c in st.classes:
            if c.base is not None:
                classes.append(c.base)
                sessions.append(engine_sessions[c.base])
                w0.append(stage1_w[c.base])
                b0.append(stage1_b[c.base])
                continue
            label = base.num_classes + enrolled.index(c)
            rows = self.view.rows[st.rows_of(c.uid)]
            stats.add(rows, np.full(len(rows), label))
            if self.borrow and engine:
                near = engine[int(np.argmin(np.linalg.norm(base.mean[engine] - stats.mean[label], axis=1)))]
                stats.borrow_scatter(label, base, near)
            classes.append(label)
            sessions.append(device_session)
            w, b = self._initial_row(stats.mean[label], base, stage1_w, stage1_b, rng)
            w0.append(w)
            b0.append(b)
        sessions = np.asarray(sessions)
        order = np.argsort(sessions, kind="stable")  # session blocks contiguous (the logit normalisation)
        last = int(sessions.max())
        blocks = np.unique(sessions[order], return_counts=True)[1].tolist()
        epochs = draw_epochs(stats, np.asarray(classes)[order], sessions[order], last, spec, rng)
        W, b, losses = align(np.asarray(w0)[order], np.asarray(b0)[order], blocks, epochs, spec)
        W *= head_scales(sessions[order], last, spec.fc_scale_mu)[:, None].astype(np.float32)
        inverse = np.argsort(order)
        self.current = (W[inverse], b[inverse])
        self.last_update = {"aligned_classes": len(order),
                            "draws": len(order) * spec.samples_per_class * spec.epochs,
                            "losses": [round(x, 4) for x in losses]}

    def _initial_row(self, mean: np.ndarray, base, stage1_w: np.ndarray, stage1_b: np.ndarray, rng) -> tuple:
        """(row, bias) an enrolled class starts the alignment from: ``normal``, N(0, 0.02^2) and 0
        (a new head in the authors' code, before its stage 1); ``imprint``, its centred mean
        direction (the engine's data mean removed) at the median norm of the stage-1 rows, the
        bias putting the engine's data mean at their median bias (where a stage 1 points)."""
        if self.init == "normal":
            return rng.normal(0.0, INIT_STD, base.dim).astype(np.float32), np.float32(0.0)
        centre = (base.mean * base.count[:, None]).sum(0) / max(float(base.count.sum()), 1.0)
        direction = mean - centre
        norm = float(np.median(np.linalg.norm(stage1_w, axis=1)))
        w = direction / max(float(np.linalg.norm(direction)), 1e-12) * norm
        return w.astype(np.float32), np.float32(np.median(stage1_b) - w @ centre)

    def solution(self) -> np.ndarray:
        """[d + 1, C]: weight.T with the bias as its last row (what the store keeps)."""
        W, b = self.current
        return np.vstack([W.T, b[None]]).astype(np.float32)
