"""Rejection scores beyond the four the device offers, on one engine's held-out training images.

    python -m experiments.open_set_scores --engine engines/ranpac90-s1993 \\
        --data ../shared/data/tiny-imagenet-100 --out runs/open-set-scores

A diagnostic behind docs/DEVICE.md, "Which score, how well": ``python -m benchmarks open_set``
chooses among msp, energy, maxlogit and the Mahalanobis distance to the ridge statistics, and no
choice beats max-softmax by much; this asks whether a known alternative would, all computed from
what a RanPAC engine directory holds (its heads and G, Q, counts), on the same ``select`` images
(train images 300-349 of every class: the engine's classes known, the others unknown), with val
beside it:

- ``relative mahalanobis`` (Ren et al., 2021): the class distance less the distance to the
  whole data's Gaussian (covariances shrunk towards their mean eigenvalue, weight 1);
- ``cosine to class means``: the largest cosine of h - mean to the centred class means;
- ``vim`` (Wang et al., CVPR 2022): max logit less alpha times the norm of h outside the 256
  leading principal directions of G / N (alpha = mean max logit / mean residual norm on the
  known images);
- ``standardised max logit``: each class's logit standardised by its mean and standard deviation
  over the engine's samples (from G, Q), then the max;
- ``leverage-penalised max logit``: max logit less 0.3 h^T (G + lambda I)^-1 h (the ridge's own
  predictive variance; needs an M x M inverse on the device).

Prints a Markdown table and writes OUT/table.md and OUT/results.json.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, parser, write_results

PROG = "python -m experiments.open_set_scores"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = parser(PROG, __doc__)
    ap.add_argument("--engine", required=True, help="a RanPAC engine directory trained on 90 classes")
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", default="/tmp/edgecl-open-set-bench")
    ap.add_argument("--out", default="runs/open-set-scores")
    args = ap.parse_args(argv)

    from benchmarks.open_set import engine_sets
    from edgecl.device.openset import auroc

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    split = engine_sets(args.engine, Path(args.data), cache)
    rt = split["rt"]
    head = rt.heads.heads["main"]
    k = len(split["old"])
    G, Q, counts = head.base_statistics()
    M, N = G.shape[0], counts.sum()
    W = head.W.astype(np.float64)
    mu = (Q / counts).T  # C x M
    mu0 = Q.sum(1) / N
    Sw = (G - (Q / counts) @ Q.T) / (N - k)
    S0 = G / N - np.outer(mu0, mu0)
    shrink = np.trace(Sw) / M
    Pw, P0 = np.linalg.inv(Sw + shrink * np.eye(M)), np.linalg.inv(S0 + shrink * np.eye(M))
    ev, V = np.linalg.eigh(G / N)
    V = V[:, ::-1][:, :256]
    A_inv = np.linalg.inv(G + head.lam * np.eye(M))
    neg_mean = mu0 @ W
    neg_sd = np.sqrt(np.maximum((W * (Q - head.lam * W)).sum(0) / N - neg_mean ** 2, 1e-30))
    centred = mu - mu0
    centred /= np.linalg.norm(centred, axis=1, keepdims=True)

    def scores(F):
        h = head.inputs(F).astype(np.float64)
        z = h @ W
        hP = h @ Pw
        d = (hP * h).sum(1)[:, None] - 2 * hP @ mu.T + ((mu @ Pw) * mu).sum(1)[None]
        r = h - mu0
        resid = np.sqrt(np.maximum((h ** 2).sum(1) - ((h @ V) ** 2).sum(1), 0))
        hc = r / np.linalg.norm(r, axis=1, keepdims=True)
        return {"maxlogit": z.max(1), "relative mahalanobis": -(d - ((r @ P0) * r).sum(1)[:, None]).min(1),
                "cosine to class means": (hc @ centred.T).max(1), "_resid": resid,
                "standardised max logit": ((z - neg_mean) / neg_sd).max(1),
                "leverage-penalised max logit": z.max(1) - 0.3 * ((h @ A_inv) * h).sum(1)}

    got = {}
    for name, (feats, y) in split["sets"].items():
        s = scores(feats["main"])
        known = y < k
        if name == "select":
            alpha = s["maxlogit"][known].mean() / s["_resid"][known].mean()  # ViM's alpha, known images only
        s["vim"] = s["maxlogit"] - alpha * s.pop("_resid")
        for label, v in s.items():
            got.setdefault(label, {})[name] = round(auroc(v[known], v[~known]), 4)
    shutil.rmtree(split["probe"], ignore_errors=True)
    rows = [[label, f"{v['select']:.4f}", f"{v['val']:.4f}", f"{v['select'] - got['maxlogit']['select']:+.4f}"]
            for label, v in got.items()]
    table = "\n".join([f"AUROC of each score on {args.engine} (select: held-out training images; val beside it):",
                       ""] + markdown_table(["score", "select", "val", "select - maxlogit"], rows)) + "\n"
    write_results(args.out, table, got, PROG, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
