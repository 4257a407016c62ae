"""Trains one learner on tiny generated data for two sessions and saves its state tensors (PET,
heads, statistics): run under ``torchrun --nproc_per_node 2`` and as one process, the two states
must agree (tests/test_distributed.py). ``python ddp_learner.py METHOD OUT.pt [CRASH_RANK]``."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import TINY_VIT, blob_images  # noqa: E402

from edgecl.backbones import create_backbone  # noqa: E402
from edgecl.config import resolve_config  # noqa: E402
from edgecl.distributed import from_env  # noqa: E402
from edgecl.learners import learner_class  # noqa: E402

# per method: the loss terms that make the step's gradient depend on the whole batch are on
# (SAFE's transfer loss with batch standardisation, cross-classification, alignment). SAFE's
# fast-statistics refresh is off: on 18 images the fast learner moves by about 0.1 % and the drift
# map's ridge fit (14 rows) turns the float-level differences of two ranks' features into a
# different map (measured: mean shift 0.0015 on one process, 0.0008 on two), and the fast head's
# lambda then flips; its inputs are gathered in row order like every other statistic
OVERRIDES = {
    "ranpac": {"pet": {"kinds": ["ssf"]}},
    "safe": {"pet": {"kinds": ["ssf"]}, "safe": {"fast_epochs": 2, "lambda_diag": 1.0, "lambda_rdn": 5.0,
                                                 "transfer_norm": "batch", "transfer_reduction": "mean",
                                                 "lambda_cc": 1.0, "lambda_cos": 1.0, "refresh_fast": False}},
    "slcapp": {"slca": {"ca_samples_per_class": 16, "ca_epochs": 2}},
}


# 18 images a session: batches of 17 and 1 (on 2 ranks the second leaves one rank without images),
# of 9 (parts of 5 and 4; SAFE's batch-standardised transfer loss is ill-conditioned on batches of
# two or three images, where float summation order alone changes its gradient) and of 4 (2 + 2,
# the last 1 + 1)
BATCH = {"ranpac": 17, "safe": 9, "slcapp": 4}


def main(method: str, out: str, crash_rank: int = -1) -> None:
    torch.set_num_threads(1)
    dist = from_env("cpu")
    cfg = resolve_config(method, overrides={
        "backbone": TINY_VIT, "data": {"input_size": 32}, "ranpac": {"M": 64},
        "train": {"epochs": 2, "batch_size": BATCH[method], "device": "cpu", "optimizer": "sgd", "lr": 0.05,
                  "head_lr": 0.05, "warmup_epochs": 0},
        **OVERRIDES[method]})
    torch.manual_seed(0)
    learner = learner_class(method)(cfg, create_backbone(cfg.backbone.name, "random", **cfg.backbone.kwargs))
    learner.progress = False
    learner.dist = dist
    for t, classes in enumerate(([0, 1], [2, 3])):
        if t == 1 and dist.rank == crash_rank:
            raise SystemExit(f"rank {dist.rank}: crashing on purpose")
        learner.learn(t, blob_images(classes, n=9, seed=t, num_names=4, key="ddp"), classes)
        learner.num_seen = classes[-1] + 1
    if dist.main:
        flat = {f"{group}/{k}": v.detach().cpu() for group, tensors in learner.state().items()
                for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        if method == "slcapp":  # the class covariances themselves: a low-rank factor is defined up to its signs
            flat = {k: v for k, v in flat.items() if not k.startswith("stats/classstats.")}
            for name, stats in (("train", learner.stats), ("export", learner.export_stats())):
                for c in stats.seen():
                    flat[f"{name}_stats/mean{c}"] = torch.from_numpy(stats.means()[c])
                    flat[f"{name}_stats/cov{c}"] = torch.from_numpy(stats.covariance(int(c)))
        torch.save(flat, out)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else -1)
