"""Images per second of edgecl's training step against a bare PyTorch loop, same model, PET and batch.

    python -m benchmarks train_throughput [--backbone tf_efficientnet_lite0] [--pet ssf] [--size 96]
        [--batch 48] [--steps 12] [--repeats 3] [--device auto] [--precision fp32] [--compile]
        [--out runs/train-throughput]

Both loops train the same PET-injected backbone (``--pet``; the embedded EfficientNet-Lite0 weights
by default, ``--weights random`` for any timm name) with a cosine head and SGD on ``--steps``
batches of ``--batch`` uint8 images of ``--size`` px:

- **edgecl**: ``Learner.fit`` as every learner trains (batch drawn from the image set, random-resized
  crop and flip, normalisation into channels-last, the step through ``edgecl.distributed``, the
  cosine learning-rate schedule, the loss terms kept per epoch);
- **bare**: the loop one writes by hand: the next slice of a pre-loaded uint8 tensor, to the device,
  normalised, forward, cross-entropy, backward, step — no augmentation, no schedule.

The figure is the ratio edgecl / bare (the issue's target: at least 0.9). Each loop runs once to warm
up, then ``--repeats`` times; the best run counts (a loaded machine only ever slows a run down).
Prints a Markdown table and writes it with results.json to ``--out``.

Under torchrun (``torchrun --standalone --nproc_per_node N -m benchmarks train_throughput ...``)
the edgecl loop trains on N processes (DistributedDataParallel, each rank a part of every batch)
and the bare loop runs in rank 0 alone: the ratio is then N processes against one.
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m benchmarks train_throughput"


def _learner(args):
    import torch

    from edgecl.backbones import create_backbone
    from edgecl.config import resolve_config
    from edgecl.learners.ranpac import RanPAC

    cfg = resolve_config("ranpac", overrides={
        "backbone": {"name": args.backbone, "weights": args.weights},
        "pet": {"kinds": [args.pet]}, "data": {"input_size": args.size},
        "train": {"batch_size": args.batch, "device": args.device, "precision": args.precision,
                  "compile": args.compile, "optimizer": "sgd", "warmup_epochs": 0}})
    torch.manual_seed(0)
    learner = RanPAC(cfg, create_backbone(args.backbone, args.weights))
    learner.progress = False
    return learner


def _images(args, n: int):
    import numpy as np

    from edgecl.data import ImageSet

    rng = np.random.RandomState(0)
    labels = np.arange(n) % args.classes
    images = rng.randint(0, 256, size=(n, args.size, args.size, 3)).astype(np.uint8)
    return ImageSet(images, labels.astype(np.int64), [f"c{c}" for c in range(args.classes)], key="throughput")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def edgecl_loop(learner, train, steps: int) -> float:
    """Seconds for ``Learner.fit`` over ``steps`` batches (one epoch of ``train``)."""
    from edgecl import pet as petlib
    from edgecl.heads import CosineHead
    from edgecl.learners.base import cross_entropy_step

    model = learner.make_pet_model()
    head = CosineHead(learner.ptm.feature_dim, int(train.labels.max()) + 1).to(learner.device)
    tc = learner.cfg.train
    params = [{"params": petlib.pet_parameters(model.model), "lr": tc.lr},
              {"params": list(head.parameters()), "lr": tc.head_lr}]
    _sync(learner.device)
    start = time.perf_counter()
    learner.fit(params, train, 1, cross_entropy_step(model, head, learner.dist), desc="edgecl", modules=(model.model,))
    _sync(learner.device)
    return time.perf_counter() - start


def bare_loop(learner, train, steps: int) -> float:
    """Seconds for the hand-written loop over the same ``steps`` batches."""
    import torch
    import torch.nn.functional as F

    from edgecl import pet as petlib
    from edgecl.heads import CosineHead

    tc, device = learner.cfg.train, learner.device
    model = learner.make_pet_model()
    if tc.compile:
        model.model.compile()
    head = CosineHead(learner.ptm.feature_dim, int(train.labels.max()) + 1).to(device)
    opt = torch.optim.SGD([{"params": petlib.pet_parameters(model.model), "lr": tc.lr},
                           {"params": list(head.parameters()), "lr": tc.head_lr}],
                          momentum=tc.momentum, weight_decay=tc.weight_decay)
    images = torch.from_numpy(train.images)
    labels = torch.from_numpy(train.labels)
    mean = torch.tensor(learner.ptm.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(learner.ptm.std, device=device).view(1, 3, 1, 1) * 255
    petlib.set_pet_train_mode(model.model, True)
    b = tc.batch_size
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        x = images[i * b:(i + 1) * b].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        y = labels[i * b:(i + 1) * b].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            loss = F.cross_entropy(head(model(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - start


def _machine(device) -> str:
    import os
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads of {os.cpu_count()}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0", help="a timm model name")
    ap.add_argument("--weights", default="default", help="'default' (embedded, EfficientNet-Lite0) or 'random'")
    ap.add_argument("--pet", default="ssf", help="the PET kind (edgecl.pet)")
    ap.add_argument("--size", type=int, default=96, help="input size in px")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=12, help="training steps per timed run")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: autocast of the steps")
    ap.add_argument("--compile", action="store_true", help="torch.compile the trained model (both loops)")
    ap.add_argument("--out", default="runs/train-throughput")
    args = ap.parse_args(argv)

    from edgecl.distributed import from_env

    dist = from_env(args.device)
    learner = _learner(args)
    learner.dist = dist
    train = _images(args, args.steps * args.batch)
    warm = _images(args, 2 * args.batch)

    def bare(images, steps):  # one process: rank 0 runs it while the others wait
        seconds = bare_loop(learner, images, steps) if dist.main else 0.0
        dist.barrier()
        return seconds

    edgecl_loop(learner, warm, 2)
    bare(warm, 2)
    times = {"edgecl": [], "bare": []}
    for _ in range(args.repeats):  # interleaved, so that a change in the machine's load hits both
        times["edgecl"].append(edgecl_loop(learner, train, args.steps))
        times["bare"].append(bare(train, args.steps))
    dist.close()
    if not dist.main:
        return 0
    n = args.steps * args.batch
    rate = {k: n / min(v) for k, v in times.items()}
    ratio = rate["edgecl"] / rate["bare"]
    machine = _machine(learner.device) + (f"; edgecl on {dist.world} processes ({dist.backend})" if dist.active else "")
    what = f"{args.backbone} + {args.pet}, {args.size} px, batch {args.batch}, {args.precision}"
    rows = [[machine, what + (", compiled" if args.compile else ""), f"{rate['edgecl']:.1f}", f"{rate['bare']:.1f}",
             f"{ratio:.2f}"]]
    table = "\n".join(markdown_table(["machine", "model and batch", "edgecl (images/s)", "bare loop (images/s)",
                                      "edgecl / bare"], rows))
    write_results(args.out, table, {"machine": machine, "device": str(learner.device), "processes": dist.world,
                                    "args": vars(args),
                                    "images_per_s": rate, "ratio": ratio, "times_s": times}, PROG, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
