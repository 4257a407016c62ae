"""Channels-last against plain NCHW memory for the PET backbone on this machine's CPU.

    python -m benchmarks channels_last [--size 96] [--batch 250] [--train-batch 48] [--out runs/channels-last]

Times a no-grad forward of ``--batch`` images and a PET training step (forward + backward)
of ``--train-batch`` images, EfficientNet-Lite0 with SSF (the quick profile's model), in both
memory formats, and prints the speed-up as a Markdown table (OUT/table.md, OUT/results.json).
The learners run channels-last (``edgecl.learners.base.Learner.prepare``). A last row times the
channels-last forward with the SSF folded into the weights (``pet.fold_pet``): how SAFE's frozen
slow learner runs after session 1 (``edgecl.learners.safe.SAFE.fold_slow``).
"""

from __future__ import annotations

import sys
import time

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m benchmarks channels_last"


def _model():
    from edgecl import pet as petlib
    from edgecl.backbones import create_backbone
    from edgecl.config import PETConfig

    bb = create_backbone("tf_efficientnet_lite0", "default")
    petlib.inject_pet(bb.model, PETConfig(kinds=["ssf"]))
    petlib.freeze_for_pet(bb.model)
    return bb


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--train-batch", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/channels-last")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    xb = torch.randn(args.train_batch, 3, args.size, args.size)
    out = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = _model().to(memory_format=fmt)
        xf, xbf = x.contiguous(memory_format=fmt), xb.contiguous(memory_format=fmt)
        model.eval()
        with torch.no_grad():
            fwd = _time(lambda model=model, xf=xf: model(xf), args.repeats)
        model.train()
        step = _time(lambda model=model, xbf=xbf: model(xbf).sum().backward(), args.repeats)
        out["channels_last" if fmt is torch.channels_last else "nchw"] = {"forward_s": fwd, "train_step_s": step}
    import copy

    from edgecl import pet as petlib

    folded = copy.deepcopy(model).eval()
    petlib.fold_pet(folded.model)
    folded = folded.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out["channels_last_folded"] = {"forward_s": _time(lambda: folded(xf), args.repeats)}
    a, b = out["nchw"], out["channels_last"]
    rows = [[f"forward of {args.batch} images ({args.size} px, no grad)", f"{a['forward_s']:.2f}",
             f"{b['forward_s']:.2f}", f"{100 * (1 - b['forward_s'] / a['forward_s']):.0f} %"],
            [f"training step of {args.train_batch} (forward + backward)", f"{a['train_step_s']:.3f}",
             f"{b['train_step_s']:.3f}", f"{100 * (1 - b['train_step_s'] / a['train_step_s']):.0f} %"],
            [f"forward of {args.batch}, SSF folded (channels-last)", f"{a['forward_s']:.2f}",
             f"{out['channels_last_folded']['forward_s']:.2f}",
             f"{100 * (1 - out['channels_last_folded']['forward_s'] / a['forward_s']):.0f} %"]]
    table = "\n".join(markdown_table(["measurement", "NCHW (s)", "channels-last (s)", "less time"], rows))
    write_results(args.out, table, {"size": args.size, "batch": args.batch, "train_batch": args.train_batch,
                                    "repeats": args.repeats, **out}, PROG, argv)
    return 0
