"""SAFE (Zhao et al., "SAFE: Slow and Fast Parameter-Efficient Tuning for Continual Learning
with Pre-Trained Models", NeurIPS 2024).

- Session 1, slow learner (Sec. 4.1): PET + a cosine head trained with cross-entropy plus the
  transfer loss from the frozen PTM (:func:`edgecl.losses.transfer_loss`); then frozen for good.
- Sessions t > 1, fast learner (Sec. 4.2): PET initialised from the slow learner and updated in
  every later session with cross-entropy over all seen classes, the cross-classification loss
  (:func:`edgecl.losses.cross_classification_loss`) and the feature-alignment loss
  (:func:`edgecl.losses.feature_alignment_loss`).
- Each learner has its own RanPAC head with its own statistics (G_s, Q_s and G_f, Q_f), updated
  with every session's data through that learner.
- Inference (Sec. 4.3): entropy-based aggregation (:func:`edgecl.losses.entropy_aggregate`) of
  each learner's logits, raw as in the paper, or divided by its temperature fitted by NLL on the
  RanPAC heads' held-out training rows with the heads fitted without them (``safe.temperature:
  fit``), or multiplied by its cosine head's sigma as in the authors' code (``safe.temperature:
  sigma``; docs/METHODS.md).
- Beyond the paper (``safe.refresh_fast``): after each fast session the old classes' rows of the
  fast head's statistics are corrected for the fast learner's drift (:mod:`edgecl.learners.drift`).
  Both options are off by default: on held-out training images neither paid
  (``python -m experiments.safe_select --aggregation``).

The training-time cosine heads: the slow one is trained in session 1; its rows for later
classes are the slow learner's class-mean features (the slow learner is frozen, so these are
exact prototypes). The fast one starts as a copy of the slow one; its rows for new classes are
initialised with the fast learner's class means and then trained.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import pet as petlib
from ..core.calibration import fit_temperature
from ..core.formats import pack, unpack
from ..heads import CosineHead, RanPACHead
from ..losses import cross_classification_loss, entropy_aggregate, feature_alignment_loss, transfer_loss
from .base import Learner, torch_labels
from .drift import ClassGaussians, fit_drift_map, refresh
from .ranpac import session_holdout


def _append_rows(head: CosineHead, rows: torch.Tensor, trainable: bool) -> None:
    weight = torch.cat([head.weight.detach(), rows.to(head.weight.device, head.weight.dtype)])
    head.weight = nn.Parameter(weight, requires_grad=trainable)


# With safe.keep_stale (and refresh and temperatures on), one run predicts SAFE's aggregate in
# the six forms of refresh_fast on / off x temperature none / fit / sigma: predictor -> (name, options)
AGGREGATION_FORMS = {
    "aggregate_stale_raw": ("statistics as accumulated, raw logits", {"refresh_fast": False, "temperature": "none"}),
    "aggregate_stale": ("statistics as accumulated, calibrated", {"refresh_fast": False, "temperature": "fit"}),
    "aggregate_stale_sigma": ("statistics as accumulated, sigma-scaled",
                              {"refresh_fast": False, "temperature": "sigma"}),
    "aggregate_raw": ("refreshed statistics, raw logits", {"refresh_fast": True, "temperature": "none"}),
    "aggregate": ("refreshed statistics, calibrated", {"refresh_fast": True, "temperature": "fit"}),
    "aggregate_sigma": ("refreshed statistics, sigma-scaled", {"refresh_fast": True, "temperature": "sigma"}),
}
ALL_FORMS = ["safe.keep_stale=true", "safe.refresh_fast=true", "safe.temperature=fit"]  # the --set that gives them


class SAFE(Learner):
    name = "safe"
    # aggregate_raw: the entropy rule on the raw logits (T = 1: the same as aggregate unless
    # safe.temperature is fit)
    predictors = ("main", "slow", "fast", "aggregate", "aggregate_raw")

    def __init__(self, cfg, backbone, device=None):
        super().__init__(cfg, backbone, device)
        d, rc = self.ptm.feature_dim, cfg.ranpac
        self.slow = self.make_pet_model()
        self.fast = self.make_pet_model()
        self.slow_head = RanPACHead(d, rc.M, cfg.seed, rc.lambdas)
        self.fast_head = RanPACHead(d, rc.M, cfg.seed + 1, rc.lambdas)
        self.slow_cls = CosineHead(d, 0).to(self.device)
        self.slow_folded = None  # set when the slow learner is frozen (fold_slow)
        self.fast_cls = CosineHead(d, 0).to(self.device)
        # the fast learner changes every session, so only the rows asked for are extracted;
        # with safe.fast_epochs = 0 it never changes and its features are cached like the slow's
        self.volatile = {"fast"} if cfg.safe.fast_epochs > 0 else set()
        self.history: dict = {}
        self.temperature = {"slow": 1.0, "fast": 1.0}  # per head; the bundle keeps slow and fast
        self.gaussians = ClassGaussians(d, cfg.safe.refresh_rank)  # fast-space class Gaussians (drift.py)
        self._before = None  # this session's fast features before the fast training
        # diagnostics (safe.keep_stale): the fast head as it would be without the refresh, with
        # its own temperature (kept out of the bundle): the four aggregations of refresh on / off
        # and temperature fit / none from one run
        self.fast_head_stale = RanPACHead(d, rc.M, cfg.seed + 1, rc.lambdas) if cfg.safe.keep_stale else None
        if self.fast_head_stale is not None:
            self.temperature["fast_stale"] = 1.0
            self.predictors = self.predictors + ("fast_stale", "aggregate_stale", "aggregate_stale_raw",
                                                 "aggregate_sigma", "aggregate_stale_sigma")
        # (out-of-sample logits, labels) of every session's held-out rows, per head
        self._heldout = {name: [] for name in self.temperature}

    # ------------------------------------------------------------------ training
    def train_slow(self, train, new_classes) -> None:
        """Session 1: CE + transfer loss (Eq. 1-4), then the slow PET is frozen."""
        tc = self.cfg.train
        self.slow_cls = CosineHead(self.ptm.feature_dim, len(new_classes)).to(self.device)
        params = [{"params": petlib.pet_parameters(self.slow.model), "lr": tc.lr},
                  {"params": list(self.slow_cls.parameters()), "lr": tc.head_lr}]
        self.history["slow"] = self.fit(params, train, tc.epochs, self.slow_step, desc="session 1: slow learner",
                                        modules=(self.slow.model,))

    def slow_step(self, x, y) -> dict:
        """The slow learner's loss terms on a batch: CE and the transfer loss (Eq. 2-4), weighted."""
        sc, join = self.cfg.safe, self.dist.join  # under torchrun: the whole batch's features (and statistics)
        f = join(self.slow(x), len(y))
        terms = {"ce": F.cross_entropy(self.slow_cls(f), y)}
        if sc.lambda_diag or sc.lambda_rdn:
            with torch.no_grad():
                f_ptm = join(self.ptm(x), len(y))
            terms.update(transfer_loss(f_ptm, f, sc.lambda_diag, sc.lambda_rdn, sc.transfer_norm,
                                       sc.transfer_reduction))
        return terms

    def start_fast(self) -> None:
        """After session 1: freeze the slow learner; the fast learner starts as its copy."""
        for p in list(self.slow.parameters()) + list(self.slow_cls.parameters()):
            p.requires_grad_(False)
        self.slow.eval()
        self.fold_slow()
        self.fast = copy.deepcopy(self.slow)
        petlib.freeze_for_pet(self.fast.model)  # PET parameters trainable again
        self.fast_cls = copy.deepcopy(self.slow_cls)
        for p in self.fast_cls.parameters():
            p.requires_grad_(True)
        self.bump("slow")
        self.bump("fast")

    def fold_slow(self) -> None:
        """The frozen slow learner with its PET folded into the backbone's weights (pet.fold_pet:
        SSF / LoRA gone, the same function up to float rounding; a forward pass costs the bare
        backbone's: python -m benchmarks channels_last), used for every slow forward pass after
        session 1. ``self.slow`` keeps the PET weights the bundle stores."""
        folded = copy.deepcopy(self.slow).eval()
        petlib.fold_pet(folded.model)
        for p in folded.parameters():
            p.requires_grad_(False)
        self.slow_folded = folded.to(self.device, memory_format=torch.channels_last)

    @property
    def slow_model(self):
        """What computes slow features: the folded slow learner once frozen (:meth:`fold_slow`)."""
        return self.slow_folded if self.slow_folded is not None else self.slow

    def train_fast(self, t, train, new_classes) -> None:
        """Session t > 1: CE + lambda_cc cross-classification + lambda_cos alignment (Eq. 5-7)."""
        tc, sc = self.cfg.train, self.cfg.safe
        part, _rows = self.my_part(train)  # under torchrun: this rank's part, the means over all
        labels = torch_labels(part)
        f_slow = self.features(self.slow_model, "slow", part)
        f_fast = self.features(self.fast, "fast", part)
        self._before = f_fast
        _append_rows(self.slow_cls, self.class_means(f_slow, labels, new_classes), trainable=False)
        _append_rows(self.fast_cls, self.class_means(f_fast, labels, new_classes), trainable=True)
        num_old = new_classes[0]
        if sc.fast_epochs > 0:
            params = [{"params": petlib.pet_parameters(self.fast.model), "lr": sc.fast_lr},
                      {"params": [self.fast_cls.weight, self.fast_cls.sigma], "lr": tc.head_lr}]
            step = functools.partial(self.fast_step, num_old=num_old)
            self.history[f"fast_{t + 1}"] = self.fit(params, train, sc.fast_epochs, step,
                                                     desc=f"session {t + 1}: fast learner", modules=(self.fast.model,))
            self.fast.eval()
            self.bump("fast")

    def fast_step(self, x, y, num_old: int) -> dict:
        """The fast learner's loss terms on a batch (Eq. 5-7), weighted: CE over all seen classes,
        lambda_cc cross-classification with the slow head, lambda_cos feature alignment."""
        sc, join = self.cfg.safe, self.dist.join  # under torchrun: the whole batch's features
        f_f = join(self.fast(x), len(y))
        with torch.no_grad():
            f_s = join(self.slow_model(x), len(y))
        terms = {"ce": F.cross_entropy(self.fast_cls(f_f), y)}
        if sc.lambda_cc:
            terms["cc"] = sc.lambda_cc * cross_classification_loss(self.fast_cls, self.slow_cls, f_f, f_s, y, num_old)
        if sc.lambda_cos:
            terms["cos"] = sc.lambda_cos * feature_alignment_loss(f_f, f_s)
        return terms

    def learn(self, t, train, new_classes):
        if t == 0:
            if self.cfg.pet.kinds and self.cfg.train.epochs > 0:
                self.train_slow(train, new_classes)
            self.start_fast()
        else:
            self.train_fast(t, train, new_classes)
        part, rows = self.my_part(train)  # under torchrun: this rank's part, the statistics summed
        labels = torch_labels(part)
        hold = session_holdout(self.cfg, t, train)[torch.as_tensor(rows)]
        feats = {"slow": self.features(self.slow_model, "slow", part), "fast": self.features(self.fast, "fast", part)}
        self.update_fast_gaussians(t, feats["fast"], labels, hold, new_classes)
        heads = [("slow", "slow", self.slow_head), ("fast", "fast", self.fast_head)]
        if self.fast_head_stale is not None:
            heads.append(("fast", "fast_stale", self.fast_head_stale))
        for tag, _name, head in heads:
            head.add(feats[tag], labels, hold, num_classes=new_classes[-1] + 1, dist=self.dist)
            head.solve(dist=self.dist)
        for tag, name, head in heads:
            self.fit_temperature(name, head, feats[tag][hold], labels[hold])
        if self.cfg.safe.temperature == "sigma":
            sigma = self.sigma_temperatures()
            self.temperature.update({name: sigma[tag] for tag, name, _head in heads})

    def _gather(self, *tensors) -> list:
        """The tensors over every rank's part, in row order (one process: as they are)."""
        if not self.dist.active:
            return list(tensors)
        parts = self.dist.gather([x.cpu() for x in tensors])
        return [torch.cat([p[i] for p in parts]) for i in range(len(tensors))]

    def update_fast_gaussians(self, t, f_fast, labels, hold, new_classes) -> None:
        """Fast-statistics refresh (edgecl.learners.drift): after a fast session, fit the fast
        space's drift on this session's images (before / after the training), correct the old
        classes' rows of G_f, Q_f and move their Gaussians; then add the new classes'."""
        sc = self.cfg.safe
        if not sc.refresh_fast:
            return
        after, labels, hold = self._gather(f_fast, labels, hold)
        if t > 0 and self._before is not None:
            (before,) = self._gather(self._before)
            D, b, alpha = fit_drift_map(before, after, hold)
            facts = refresh(self.fast_head, self.gaussians, D, b, range(new_classes[0]), sc.refresh_draws,
                            seed=self.cfg.seed + 104729 * t)
            self.history.setdefault("refresh", []).append({"session": t + 1, "alpha": alpha, **facts})
        self._before = None
        self.gaussians.add(after, labels, new_classes)

    def fit_temperature(self, name, head, f_hold, y_hold) -> None:
        """T of one head (slow, fast or the diagnostic fast_stale) by NLL (Guo et al., 2017) over
        the held-out rows of every session so far, each scored when its session ended by the head
        fitted without the held-out rows."""
        if self.cfg.safe.temperature != "fit":
            return
        z = head.project(f_hold) @ head.fit_weights()
        z, y = self._gather(z, y_hold)
        if len(y):
            self._heldout[name].append((z.numpy(), y.numpy()))
        if self._heldout[name]:
            self.temperature[name] = fit_temperature([a for a, _ in self._heldout[name]],
                                                     [b for _, b in self._heldout[name]])

    def sigmas(self) -> dict:
        """Each learner's cosine-head scale sigma (the slow head's fixed after session 1, the fast
        head's trained on)."""
        return {"slow": self.slow_cls.sigma.item(), "fast": self.fast_cls.sigma.item()}

    def sigma_temperatures(self) -> dict:
        """``safe.temperature: sigma``: T = 1 / sigma of each learner's cosine head, i.e. its RanPAC
        logits multiplied by sigma as in the authors' code (``inc_net.py``: ``out = self.sigma *
        out``)."""
        return {name: 1.0 / s for name, s in self.sigmas().items()}

    # ------------------------------------------------------------------ inference
    def predict(self, images, rows=None):
        sc = self.cfg.safe
        f_fast = self.features(self.fast, "fast", images, rows)
        l_slow = self.slow_head.logits(self.features(self.slow_model, "slow", images, rows))
        l_fast = self.fast_head.logits(f_fast)
        agg, _weights = self.aggregate(l_slow, l_fast)
        raw, _ = entropy_aggregate(l_slow, l_fast, sc.gamma)
        main = {"aggregate": agg, "slow": l_slow, "fast": l_fast}[sc.inference]
        out = {"main": main, "slow": l_slow, "fast": l_fast, "aggregate": agg, "aggregate_raw": raw}
        if self.fast_head_stale is not None:
            l_stale = self.fast_head_stale.logits(f_fast)
            out["fast_stale"] = l_stale
            out["aggregate_stale"] = entropy_aggregate(l_slow / self.temperature["slow"],
                                                       l_stale / self.temperature["fast_stale"], sc.gamma)[0]
            out["aggregate_stale_raw"] = entropy_aggregate(l_slow, l_stale, sc.gamma)[0]
            sigma = self.sigma_temperatures()
            for key, l_f in (("aggregate_sigma", l_fast), ("aggregate_stale_sigma", l_stale)):
                out[key] = entropy_aggregate(l_slow / sigma["slow"], l_f / sigma["fast"], sc.gamma)[0]
        return {k: v.numpy() for k, v in out.items()}

    def aggregate(self, l_slow: torch.Tensor, l_fast: torch.Tensor) -> tuple:
        """SAFE's prediction (Eq. 8-9) on each learner's logits over its temperature:
        (logits, weights [N, 2])."""
        return entropy_aggregate(l_slow / self.temperature["slow"], l_fast / self.temperature["fast"],
                                 self.cfg.safe.gamma)

    def aggregation_weights(self, logits: dict) -> np.ndarray:
        """Per image, the entropy aggregation weights [N, 2] of slow and fast (Eq. 8-9)."""
        _agg, weights = self.aggregate(torch.as_tensor(logits["slow"]), torch.as_tensor(logits["fast"]))
        return weights.numpy()

    def session_facts(self, logits: dict, labels: np.ndarray, session_of_label: np.ndarray) -> dict:
        """Per session (metrics.json): the mean aggregation weight of each learner on the test
        images, the slow learner's mean weight on the images of each class range (the session
        that brought the classes; the paper's Fig. 5), the temperatures and the cosine heads'
        sigmas (what ``safe.temperature: sigma`` scales by)."""
        w = self.aggregation_weights(logits)
        sessions = session_of_label[labels]
        by_range = [round(float(w[sessions == j, 0].mean()), 4) for j in range(int(sessions.max()) + 1)]
        sigma = self.sigmas()
        return {"w_slow": round(float(w[:, 0].mean()), 4), "w_fast": round(float(w[:, 1].mean()), 4),
                "w_slow_by_range": by_range,
                "T_slow": round(self.temperature["slow"], 5), "T_fast": round(self.temperature["fast"], 5),
                "sigma_slow": round(sigma["slow"], 4), "sigma_fast": round(sigma["fast"], 4)}

    def feature_models(self):
        return {"slow": self.slow, "fast": self.fast}

    # ------------------------------------------------------------------ bundle
    def state(self):
        out = {"pet": {}, "heads": {}, "stats": {}}
        for name, model, head, cls in (("slow", self.slow, self.slow_head, self.slow_cls),
                                       ("fast", self.fast, self.fast_head, self.fast_cls)):
            out["pet"].update({f"{name}.{k}": v for k, v in petlib.pet_state_dict(model.model).items()})
            out["heads"].update(pack(head.head_tensors(), "ranpac", name))
            out["heads"].update(pack(cls.state_dict(), f"{name}_cls"))  # the training-time cosine head (not exported)
            out["stats"].update(pack(head.stats_tensors(), "ranpac", name))
        return out

    def meta(self):
        return {**super().meta(), "feature_dim": self.ptm.feature_dim, "head": "ranpac", "learners": ["slow", "fast"],
                "ranpac": {name: {"M": h.M, "seed": h.seed, "lambda": h.lam}
                           for name, h in (("slow", self.slow_head), ("fast", self.fast_head))},
                "gamma": self.cfg.safe.gamma, "inference": self.cfg.safe.inference, "history": self.history,
                "temperatures": {name: self.temperature[name] for name in ("slow", "fast")}}

    def load_state(self, tensors, meta):
        for name, model, head, cls_attr in (("slow", self.slow, self.slow_head, "slow_cls"),
                                            ("fast", self.fast, self.fast_head, "fast_cls")):
            prefix = f"{name}."
            petlib.load_pet_state_dict(model.model, {k[len(prefix):]: v for k, v in tensors["pet"].items()
                                                     if k.startswith(prefix)})
            model.eval()
            head.load_state({**unpack(tensors["heads"], "ranpac", name), **unpack(tensors["stats"], "ranpac", name)})
            cosine = unpack(tensors["heads"], f"{name}_cls")
            cls = CosineHead(self.ptm.feature_dim, cosine["weight"].shape[0])
            cls.load_state_dict(cosine)
            setattr(self, cls_attr, cls.to(self.device))
            self.bump(name)
        self.num_seen = self.slow_head.num_classes
        self.fold_slow()
        self.temperature.update(meta.get("temperatures") or {})

    # ------------------------------------------------------------------ figure
    def figures(self, labels: np.ndarray, logits: dict, session_of_label: np.ndarray) -> dict:
        """The aggregation analysis (as the paper's Fig. 4): per class range (session), the
        accuracy of slow, fast and aggregate, and the mean aggregation weight of each learner."""
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sessions = session_of_label[labels]
        n_sess = int(sessions.max()) + 1
        ranges = [np.where(sessions == j)[0] for j in range(n_sess)]
        first = [int(np.where(session_of_label == j)[0].min()) for j in range(n_sess)]
        last = [int(np.where(session_of_label == j)[0].max()) for j in range(n_sess)]
        names = [f"{a}-{b}" for a, b in zip(first, last)]
        x = np.arange(n_sess)
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), dpi=120, sharex=True)
        for k, (name, color) in enumerate((("slow", "tab:blue"), ("fast", "tab:orange"), ("aggregate", "tab:green"))):
            pred = logits[name].argmax(1)
            acc = [100.0 * float((pred[r] == labels[r]).mean()) for r in ranges]
            ax1.bar(x + (k - 1) * 0.27, acc, 0.27, label=name, color=color)
        ax1.set_ylabel("accuracy (%)")
        ax1.legend(ncol=3, fontsize=8)
        ax1.set_title("SAFE after the last session, by class range (session)")
        # the weights from the gathered logits (under torchrun each rank predicted a part)
        w = self.aggregation_weights(logits)
        ax2.bar(x - 0.2, [w[r, 0].mean() for r in ranges], 0.4, label="slow weight", color="tab:blue")
        ax2.bar(x + 0.2, [w[r, 1].mean() for r in ranges], 0.4, label="fast weight", color="tab:orange")
        ax2.set_ylabel("mean aggregation weight")
        ax2.set_xticks(x, names, rotation=45, fontsize=7)
        ax2.set_xlabel("classes (incremental ids)")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        return {"aggregation.png": buf.getvalue()}
