r"""Choose SAFE's free hyper-parameters on held-out *training* images, never on test images.

    python -m experiments.safe_select --data ../shared/data/tiny-imagenet-100 --out runs/safe-select

The quick protocol trains on the first 100 training images of each class (sorted by file
name); tiny-imagenet-100 has 500. This script builds a validation ImageFolder of symlinks to
training images the protocol never reads (the last ``--val-per-class`` of each class) and runs
the quick protocol with those as the evaluation set, once per candidate (``--candidate
NAME:KEY=VALUE[,KEY=VALUE]``; the defaults below). The val/ folder of the data is not read.

Default candidates: the transfer-loss weights of the slow learner (Eq. 2-3), with the fast
learner switched off (``safe.fast_epochs=0``), because the transfer loss only shapes the slow
learner and the slow learner's RanPAC head alone is what it is judged by. Prints slow-alone,
fast-alone and aggregate A_last / A_avg per candidate and writes OUT/select.md and
OUT/select.json.

The fast learner's alignment weight was chosen the same way (docs/METHODS.md), one candidate
per process (they share --out and the held-out folder)::

    python -m experiments.safe_select --data ../shared/data/tiny-imagenet-100 --out runs/safe-select \
        --candidate "cos 15:safe.lambda_cos=15"

``--gamma-sweep NAME:KEY=VALUE[,...]`` trains one full SAFE run that way (evaluated on the
held-out images) and then recomputes its final aggregate for each ``--gammas`` value from the
slow and fast logits (gamma only acts at inference, Eq. 8-9), raw and over the bundle's
temperatures, then a few other per-image rules and the oracle, writing OUT/gamma-NAME.md and
OUT/gamma-NAME.json. ``--sweep-bundle DIR`` does the same for a bundle already trained on this
held-out protocol (e.g. a candidate's run under --out).

``--aggregation`` chooses SAFE's aggregation form (``safe.refresh_fast`` on / off ×
``safe.temperature`` none / fit / sigma, the six combinations) on the held-out images, from one
SAFE run per ``--seeds`` seed with ``safe.keep_stale=true`` (the fast training does not depend on
either option, so the run's predictors ``aggregate``, ``aggregate_raw``, ``aggregate_sigma`` and
their ``_stale`` twins are the six): the one with the best mean A_last wins (the first listed,
the paper's form, on a tie); writes OUT/aggregation.md and OUT/aggregation.json::

    python -m experiments.safe_select --data ../shared/data/tiny-imagenet-100 --out runs/safe-aggregation \
        --aggregation --seeds 1993 1996 1997 --set train.threads=1

The outcomes (the transfer loss per-sample L2, summed, 0.001 / 1; lambda_cos 15 in the quick
profile; the paper's aggregation form; gamma 1 kept) are in
docs/METHODS.md (SAFE); the aggregation rules and the oracle in docs/BENCHMARKS.md (SAFE).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.common import markdown_table, parser, predictor_metrics, read_manifest, run_quick, write_results

PROG = "python -m experiments.safe_select"

_BATCH_MEAN = "safe.transfer_norm=batch,safe.transfer_reduction=mean,safe.fast_epochs=0"
_SAMPLE_SUM = "safe.transfer_norm=sample,safe.transfer_reduction=sum,safe.fast_epochs=0"
# the transfer-loss grid (issue 16): two normalisations, each over three orders of magnitude of
# the weights; "sample sum 0.01 10" is the authors' ImageNet-A setting (args/imageneta_publish.csv)
DEFAULT_CANDIDATES = [
    f"batch mean 0.01 0.05:safe.lambda_diag=0.01,safe.lambda_rdn=0.05,{_BATCH_MEAN}",
    f"batch mean 0.1 0.5:safe.lambda_diag=0.1,safe.lambda_rdn=0.5,{_BATCH_MEAN}",
    f"batch mean 1 5:safe.lambda_diag=1,safe.lambda_rdn=5,{_BATCH_MEAN}",
    f"sample sum 0.001 1:safe.lambda_diag=0.001,safe.lambda_rdn=1,{_SAMPLE_SUM}",
    f"sample sum 0.01 10:safe.lambda_diag=0.01,safe.lambda_rdn=10,{_SAMPLE_SUM}",
    # the grid first had "sample sum 0.1 100" here; it was moved down after 0.01 / 10 came out
    # 6 points below 0.001 / 1 on the held-out images (docs/METHODS.md)
    f"sample sum 0.0001 0.1:safe.lambda_diag=0.0001,safe.lambda_rdn=0.1,{_SAMPLE_SUM}",
]
# for the record, not a candidate (a weight of zero is RanPAC's first session, not SAFE)
REFERENCE = "no transfer loss:safe.lambda_diag=0,safe.lambda_rdn=0,safe.fast_epochs=0"


def build_heldout(train_dir: Path, out: Path, per_class: int, skip: int) -> Path:
    """Symlinks to the last ``per_class`` training images of every class (sorted by name as
    the loader sorts them), all beyond the first ``skip`` the protocol trains on."""
    out.mkdir(parents=True, exist_ok=True)
    for cls in sorted(e.name for e in os.scandir(train_dir) if e.is_dir()):
        names = sorted(n for n in os.listdir(train_dir / cls) if _is_image(n))
        if len(names) < skip + per_class:
            raise SystemExit(f"{train_dir / cls}: {len(names)} images, need {skip + per_class} for a held-out split")
        (out / cls).mkdir(exist_ok=True)
        for n in names[-per_class:]:
            try:  # several candidates may run in parallel processes sharing --out
                (out / cls / n).symlink_to((train_dir / cls / n).resolve())
            except FileExistsError:
                pass
    return out


def quick_setup(method: str, data: str, seed: int, sets: list, slca: dict | None = None) -> tuple:
    """(config, train set, val set, scenario) of one quick-protocol run of ``method`` on ``data``
    (``--set`` overrides ``sets``, then ``slca`` over the slca section), torch threads set and
    every generator seeded, as ``edgecl train --profile quick`` starts."""
    import torch

    from edgecl.config import parse_set, resolve_config
    from edgecl.data import build_scenario, load_dataset
    from edgecl.train import seed_everything

    overrides = parse_set(sets)
    overrides.setdefault("data", {})["root"] = data
    overrides["seed"] = seed
    overrides.setdefault("slca", {}).update(slca or {})
    cfg = resolve_config(method, "quick", None, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed)
    train_set, val_set = load_dataset(cfg.data, progress=False)
    scenario = build_scenario(len(train_set.class_names), cfg.data.split, cfg.seed, cfg.data.num_classes)
    return cfg, train_set, val_set, scenario


def heldout_and_val(cfg, data: str, out, per_class: int, train_set, val_set, scenario) -> dict:
    """{"heldout": the last ``per_class`` training images of every class (beyond the ones the
    protocol trains on; :func:`build_heldout` under OUT/heldout), "val": the val images}, both
    with the scenario's incremental labels."""
    from edgecl.data import load_imagefolder
    from edgecl.learners.base import to_incremental

    heldout_dir = build_heldout(Path(data) / "train", Path(out) / "heldout", per_class,
                                skip=cfg.data.train_per_class or 0)
    heldout = load_imagefolder(heldout_dir, size=cfg.data.input_size, progress=False)
    if heldout.class_names != train_set.class_names:
        raise SystemExit(f"{heldout_dir}: its classes differ from the training data's")
    label_map = scenario.label_map(len(train_set.class_names))
    return {"heldout": to_incremental(heldout, label_map), "val": to_incremental(val_set, label_map)}


def _is_image(name: str) -> bool:
    """An image file name as edgecl's ImageFolder loader counts one: a known extension in any
    case, not hidden."""
    from edgecl.data import IMAGE_EXTENSIONS

    stem, dot, ext = name.rpartition(".")
    return bool(stem) and dot == "." and name[0] != "." and ext.lower() in IMAGE_EXTENSIONS


def _percent_correct(pred, y) -> float:
    import numpy as np

    return 100.0 * float((np.asarray(pred) == y).mean())


def _aggregation_rules(l_slow, l_fast, y) -> list:
    """Per-image combinations of the two heads other than Eq. 8-9, for the record (none is
    used by SAFE): entropy after a temperature on the logits, the head with the larger top-2
    margin or top logit, the average of per-image z-scored logits, and the oracle that takes
    whichever head is right (an upper bound no rule can reach without the label)."""
    import numpy as np
    import torch

    from edgecl.losses import entropy_aggregate

    def acc(pred):
        return _percent_correct(pred, y)

    def margin(logits):
        top = np.sort(logits, 1)
        return top[:, -1] - top[:, -2]

    def z(logits):
        return (logits - logits.mean(1, keepdims=True)) / logits.std(1, keepdims=True)

    rows = []
    for t in (0.1, 0.03, 0.01):
        agg, _ = entropy_aggregate(torch.from_numpy(l_slow) / t, torch.from_numpy(l_fast) / t, 1.0)
        rows.append({"rule": f"entropy of softmax(logits / {t})", "A_last": acc(agg.argmax(1).numpy())})
    ps, pf = l_slow.argmax(1), l_fast.argmax(1)
    rows.append({"rule": "head with the larger top-2 margin",
                 "A_last": acc(np.where(margin(l_slow) >= margin(l_fast), ps, pf))})
    rows.append({"rule": "head with the larger top logit",
                 "A_last": acc(np.where(l_slow.max(1) >= l_fast.max(1), ps, pf))})
    rows.append({"rule": "average of per-image z-scored logits", "A_last": acc((z(l_slow) + z(l_fast)).argmax(1))})
    rows.append({"rule": "oracle: the right head when either is right", "A_last": acc(np.where(ps == y, ps, pf))})
    return rows


def gamma_sweep(bundle: Path, heldout: Path, gammas) -> list:
    """Final held-out accuracy of the entropy aggregate for each gamma, from one bundle, then
    the other aggregation rules of :func:`_aggregation_rules`."""
    import torch

    from edgecl.data import load_imagefolder
    from edgecl.learners.base import with_labels
    from edgecl.losses import entropy_aggregate
    from edgecl.train import load_learner

    learner, _ = load_learner(str(bundle))
    manifest = read_manifest(bundle)
    images = load_imagefolder(heldout, size=manifest["input"]["size"], progress=False)
    rows, y = images.relabel(manifest["classes"]["names"])
    logits = learner.predict(with_labels(images.subset(rows), y))
    l_slow, l_fast = torch.from_numpy(logits["slow"]), torch.from_numpy(logits["fast"])
    temps = manifest["learner"].get("temperatures") or {}
    t_slow, t_fast = temps.get("slow", 1.0), temps.get("fast", 1.0)
    out = []
    for g in gammas:
        agg, w = entropy_aggregate(l_slow, l_fast, g)
        cal, wc = entropy_aggregate(l_slow / t_slow, l_fast / t_fast, g)  # the bundle's temperatures
        out.append({"gamma": g, "A_last": _percent_correct(agg.argmax(1).numpy(), y),
                    "w_slow_mean": float(w[:, 0].mean()), "w_slow_std": float(w[:, 0].std()),
                    "A_last_calibrated": _percent_correct(cal.argmax(1).numpy(), y),
                    "w_slow_mean_calibrated": float(wc[:, 0].mean())})
    out += [{"gamma": f"{k} alone", "A_last": _percent_correct(logits[k].argmax(1), y)} for k in ("slow", "fast")]
    out += [{"gamma": r["rule"], "A_last": r["A_last"]} for r in _aggregation_rules(logits["slow"], logits["fast"], y)]
    return out


def select_aggregation(train_dir: Path, heldout: Path, out: Path, seeds, sets) -> dict:
    """The six aggregation forms (``edgecl.learners.safe.AGGREGATION_FORMS``) on the held-out
    images, one SAFE run per seed (refresh and temperatures on, the stale head kept); the best
    mean A_last wins."""
    from benchmarks.common import mean_std
    from edgecl.learners.safe import AGGREGATION_FORMS, ALL_FORMS

    forms = [(name, options, key) for key, (name, options) in AGGREGATION_FORMS.items()]

    per_seed = {}
    for seed in seeds:
        run = out / f"aggregation-s{seed}"
        m = run_quick("safe", seed, str(train_dir), run, [*ALL_FORMS, *sets, f"data.val_root={heldout}"], reuse=True)
        per_seed[seed] = {name: {k: predictor_metrics(m, key, run)[k] for k in ("A_last", "A_avg")}
                          for name, _o, key in forms}
        per_seed[seed] |= {f"{k} alone": {x: m[k][x] for x in ("A_last", "A_avg")}
                           for k in ("slow", "fast", "fast_stale")}
        print(f"seed {seed}: " + ", ".join(f"{n} {v['A_last']:.2f}" for n, v in per_seed[seed].items()),
              file=sys.stderr, flush=True)
    means = {name: sum(per_seed[s][name]["A_last"] for s in seeds) / len(seeds) for name, _o, _k in forms}
    best = max(means, key=means.get)
    return {"seeds": list(seeds), "per_seed": per_seed, "mean_A_last": means, "chosen": best,
            "options": {name: o for name, o, _k in forms}[best],
            "rows": [[name, mean_std([per_seed[s][name]["A_last"] for s in seeds]),
                      mean_std([per_seed[s][name]["A_avg"] for s in seeds]),
                      " / ".join(f"{per_seed[s][name]['A_last']:.2f}" for s in seeds)]
                     for name in per_seed[seeds[0]]]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--data", required=True, help="tiny-imagenet-100 (its train/ folder is used)")
    ap.add_argument("--seed", type=int, default=1993)
    ap.add_argument("--val-per-class", type=int, default=50)
    ap.add_argument("--candidate", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]")
    ap.add_argument("--gamma-sweep", metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                    help="train this SAFE configuration on the held-out protocol and sweep gamma on it")
    ap.add_argument("--gammas", nargs="+", type=float, default=[0, 1, 10, 30, 100, 300, 1000])
    ap.add_argument("--sweep-bundle", metavar="DIR",
                    help="sweep an existing SAFE bundle trained on this held-out protocol (e.g. OUT/cos_15) "
                         "instead of training one with --gamma-sweep")
    ap.add_argument("--only", nargs="+", type=int, metavar="I",
                    help="run only these default candidates (0-based; several processes can share --out)")
    ap.add_argument("--reference", action="store_true", help="also run the no-transfer-loss reference")
    ap.add_argument("--aggregation", action="store_true",
                    help="choose the aggregation form (refresh on/off x temperature none/fit/sigma) over --seeds")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1993, 1996, 1997], help="for --aggregation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every candidate (e.g. train.threads=1; not part of the recipe)")
    ap.add_argument("--out", default="runs/safe-select")
    args = ap.parse_args(argv)
    out = Path(args.out)
    train_dir = Path(args.data) / "train"
    heldout = build_heldout(train_dir, out / "heldout", args.val_per_class, skip=100)
    if args.aggregation:
        res = select_aggregation(train_dir, heldout, out, args.seeds, args.set)
        lines = markdown_table([f"aggregation (held-out training images, seeds {' '.join(map(str, args.seeds))})",
                                "A_last", "A_avg", "A_last per seed"], res.pop("rows"))
        lines.append(f"\nchosen: {res['chosen']} (safe.refresh_fast={str(res['options']['refresh_fast']).lower()}, "
                     f"safe.temperature={res['options']['temperature']})")
        write_results(out, "\n".join(lines), res, PROG, argv, md="aggregation.md", json_name="aggregation.json")
        return 0
    if args.gamma_sweep or args.sweep_bundle:
        if args.sweep_bundle:
            bundle = Path(args.sweep_bundle)
            name = bundle.name
        else:
            name, sets = args.gamma_sweep.split(":", 1)
            bundle = out / f"gamma-{name.replace(' ', '_')}"
            run_quick("safe", args.seed, str(train_dir), bundle, sets.split(",") + [f"data.val_root={heldout}"],
                      reuse=True)
        sweep = gamma_sweep(bundle, heldout, args.gammas)
        rows = [[r["gamma"], f"{r['A_last']:.2f}",
                 f"{r['w_slow_mean']:.3f} ({r['w_slow_std']:.3f})" if "w_slow_mean" in r else "-",
                 f"{r['A_last_calibrated']:.2f}" if "A_last_calibrated" in r else "-",
                 f"{r['w_slow_mean_calibrated']:.3f}" if "w_slow_mean_calibrated" in r else "-"] for r in sweep]
        lines = markdown_table([f"gamma ({name}, held-out training images)", "aggregate A_last (raw logits)",
                                "mean slow weight (std)", "aggregate A_last (logits / T)", "mean slow weight"], rows)
        stem = f"gamma-{name.replace(' ', '_')}"
        write_results(out, "\n".join(lines), {"bundle": str(bundle), "sweep": sweep}, PROG, argv, md=f"{stem}.md",
                      json_name=f"{stem}.json")
        return 0
    rows = []
    specs = args.candidate or [c for i, c in enumerate(DEFAULT_CANDIDATES) if args.only is None or i in args.only]
    for spec in specs + ([REFERENCE] if args.reference else []):
        name, sets = spec.split(":", 1)
        sets = sets.split(",") + args.set + [f"data.val_root={heldout}"]
        m = run_quick("safe", args.seed, str(train_dir), out / name.replace(" ", "_"), sets, reuse=True)
        rows.append({"name": name, "sets": sets[:-1 - len(args.set)],
                     **{k: {x: m[k][x] for x in ("A_last", "A_avg")} if k != "aggregate" else
                        {x: m[x] for x in ("A_last", "A_avg")}
                        for k in ("slow", "fast", "aggregate")}, "wall_s": m["wall_s"]})
        r = rows[-1]
        print(f"{name}: slow {r['slow']['A_last']:.2f} fast {r['fast']['A_last']:.2f} "
              f"aggregate {r['aggregate']['A_last']:.2f} ({m['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    table_rows = [[r["name"], *(f"{r[k]['A_last']:.2f} / {r[k]['A_avg']:.2f}" for k in ("slow", "fast", "aggregate"))]
                  for r in rows]
    lines = markdown_table(["candidate (held-out training images)", "slow A_last / A_avg", "fast A_last / A_avg",
                            "aggregate A_last / A_avg"], table_rows)
    write_results(out, "\n".join(lines), rows, PROG, argv, md="select.md", json_name="select.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
