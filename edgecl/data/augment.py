"""Batches for training: index batches over a set, and random-resized-crop and flip of a whole batch.

torch is imported lazily, inside the functions: importing this module (and :mod:`edgecl.data`)
does not import torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def augment_batch(x: "torch.Tensor", *, crop_scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True,
                  generator: Optional["torch.Generator"] = None, batch_size: Optional[int] = None,
                  rows: Optional[np.ndarray] = None) -> "torch.Tensor":
    """Random-resized-crop (area fraction in ``crop_scale``, aspect ratio in ``ratio``) and a
    random horizontal flip for a whole NHWC batch: one affine sampling grid and one bilinear
    ``grid_sample`` call, no per-image loop. Output has the input's NHWC shape, dtype (uint8 in -> rounded uint8 out)
    and device; it is a channels-last view (``out.permute(0, 3, 1, 2)`` is contiguous NCHW, which
    is what :class:`~edgecl.backbones.Normalize` makes of it), so call ``.contiguous()`` before
    ``.view()``.

    Crop sizes follow torchvision's ``RandomResizedCrop``: up to 10 draws per image, then the
    whole image (ratio-clamped) as fallback. Random numbers come from ``generator`` (CPU); the
    sampling runs on ``x``'s device (a GPU batch is augmented on the GPU).

    ``x`` may be the rows ``rows`` of a batch of ``batch_size`` images (a rank's part under
    torchrun): the crops are drawn for the whole batch and these rows get theirs, so the parts
    of all ranks together are exactly the augmented whole batch.
    """
    import torch
    import torch.nn.functional as F

    if x.ndim != 4:
        raise ValueError(f"augment_batch expects an NHWC batch, got shape {tuple(x.shape)}")
    n, h, w, _c = x.shape
    if rows is not None and (batch_size is None or len(rows) != n):
        raise ValueError("augment_batch: rows needs batch_size and one row index per image of x")
    if n == 0:
        return x.clone()
    tries = 10
    u = torch.rand(2 * tries + 3, batch_size or n, generator=generator, dtype=torch.float64)
    if rows is not None:
        u = u[:, torch.as_tensor(rows)]
    lo, hi = float(crop_scale[0]), float(crop_scale[1])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = (lo + (hi - lo) * u[:tries]) * (h * w)
    r = torch.exp(log_lo + (log_hi - log_lo) * u[tries:2 * tries])
    cw, ch = torch.sqrt(area * r), torch.sqrt(area / r)
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = ok.to(torch.int64).argmax(0, keepdim=True)
    cw, ch = cw.gather(0, first)[0], ch.gather(0, first)[0]
    in_ratio = w / h
    fb_w, fb_h = (w, w / ratio[0]) if in_ratio < ratio[0] else ((h * ratio[1], h) if in_ratio > ratio[1] else (w, h))
    any_ok = ok.any(0)
    sx = torch.where(any_ok, cw, torch.full_like(cw, fb_w)) / w
    sy = torch.where(any_ok, ch, torch.full_like(ch, fb_h)) / h
    tx = (2 * u[2 * tries] - 1) * (1 - sx)
    ty = (2 * u[2 * tries + 1] - 1) * (1 - sy)
    if hflip:
        sx = torch.where(u[2 * tries + 2] < 0.5, -sx, sx)
    # The affine_grid of theta = [[sx, 0, tx], [0, sy, ty]] (align_corners=False), built
    # separably: the same grid, several times cheaper than F.affine_grid's batched matmul on CPU.
    base_x = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    base_y = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    gx = (sx[:, None] * base_x + tx[:, None]).float().to(x.device)
    gy = (sy[:, None] * base_y + ty[:, None]).float().to(x.device)
    grid = torch.stack((gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)), dim=-1)
    xf = x.permute(0, 3, 1, 2).float()
    out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if x.dtype == torch.uint8:
        out = out.add_(0.5).clamp_(0, 255).to(torch.uint8)  # round half up (values are >= 0)
    else:
        out = out.to(x.dtype)
    return out.permute(0, 2, 3, 1)


def iterate_batches(n: int, batch_size: int, *, shuffle: bool, generator: Optional["torch.Generator"] = None,
                    drop_last: bool = False) -> Iterator[np.ndarray]:
    """Yield int64 index arrays covering ``range(n)`` in batches (a seeded shuffle when
    ``shuffle``; the order comes from ``torch.randperm(n, generator=generator)``)."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    order = order.astype(np.int64, copy=False)
    stop = (n // batch_size) * batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        yield order[s:s + batch_size]
