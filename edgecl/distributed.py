"""Training on several processes: ``torchrun`` and DistributedDataParallel, exact statistics.

``edgecl train`` runs unchanged under ``torchrun`` (``torchrun --standalone --nproc_per_node N
-m edgecl train ...``; multi-node with torchrun's rendezvous options). :func:`from_env` reads
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group
(NCCL on CUDA, Gloo on the CPU); without it, :data:`SINGLE` is a one-process stand-in whose
operations do nothing, so the learners have one code path.

What is split and what is reduced (docs/DESIGN.md, "Training on several processes"):

- gradients: every training step goes through ``DistributedDataParallel`` (:meth:`Dist.step`):
  the global batch (the single-process batch, drawn and augmented identically on every rank
  from the same seeded generator) is split into contiguous parts, each rank runs the backbone
  on its part only, and :meth:`Dist.join` gathers the parts' features back into the global
  batch (differentiably), so every loss — the batch-statistics ones too, as SAFE's transfer
  loss — is the single-process loss of the whole batch, and DDP's averaged gradient is the
  single-process gradient up to float summation order;
- statistics: each rank passes over its part of a session's images (:meth:`Dist.part`) and the
  additive statistics (RanPAC's G, Q, counts and held-out parts; prototype sums and counts;
  class means; SLCA's class statistics) are summed over the ranks (:meth:`Dist.sum`,
  :meth:`Dist.gather`): the single-process statistics up to float summation order;
- solves: the lambda search and the ridge solve run on rank 0 and are broadcast;
- evaluation: each rank predicts its part of the val images; predictions are gathered;
- output: rank 0 alone logs, draws progress bars and writes the bundle.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
from typing import Callable, Optional

import numpy as np

from .core.errors import EdgeclError


class PeerLost(EdgeclError):
    """Another rank of the run stopped (a collective failed): this rank stops too."""


class Dist:
    """One process's view of the run: ``rank`` of ``world`` processes (one process: 0 of 1)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: Optional[str] = None):
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def torch_device(self):
        """This rank's GPU under NCCL (``cuda:LOCAL_RANK``); None otherwise (the configured device)."""
        if self.backend != "nccl":
            return None
        import torch

        return torch.device("cuda", self.local_rank)

    def stop_on_sigterm(self) -> None:
        """When one rank fails, torchrun stops the others with SIGTERM: turn it into a one-line
        :class:`PeerLost` (nothing is written: the bundle is written last, atomically, by rank 0)."""
        if not self.active:
            return
        import signal

        def stop(_signum, _frame):
            raise PeerLost(f"rank {self.rank}: stopped by torchrun because another rank of the run failed (its "
                           f"message is above); no bundle is written")

        signal.signal(signal.SIGTERM, stop)

    def close(self) -> None:
        """Leave the process group; from here on SIGTERM ends the process as usual."""
        if not self.active:
            return
        import signal

        import torch.distributed as dist

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_initialized():
            dist.destroy_process_group()

    # ----------------------------------------------------------------- data
    def part(self, n: int) -> np.ndarray:
        """This rank's contiguous share of ``range(n)`` (all of it on one process)."""
        return np.array_split(np.arange(n), self.world)[self.rank]

    def batch_part(self, n: int) -> np.ndarray:
        """This rank's rows of a global batch of ``n`` (a rank with none gets row 0 as a stand-in,
        which :meth:`join` drops, so that every rank runs every step)."""
        mine = self.part(n)
        return mine if len(mine) else np.zeros(1, np.int64)

    def join(self, features, n: int):
        """The global batch's ``[n, d]`` features from every rank's part (:meth:`batch_part`).

        Differentiable: backward hands each rank the summed gradient of its own rows, i.e.
        ``world`` times the gradient of the (identical) loss every rank computes, which DDP's
        average over the ranks turns back into the single-process gradient."""
        if not self.active:
            return features
        sizes = [len(p) for p in np.array_split(np.arange(n), self.world)]
        return self._run("gathering a batch", lambda: _join_function().apply(features[:sizes[self.rank]], sizes))

    # ----------------------------------------------------------------- collectives
    _PEER_GONE = ("connection", "peer", "broken pipe", "timed out", "timeout", "socket", "closed", "nccl")

    def _run(self, what: str, fn: Callable):
        try:
            return fn()
        except RuntimeError as exc:  # gloo / NCCL: a peer went away
            if not any(w in str(exc).lower() for w in self._PEER_GONE):
                raise
            raise PeerLost(f"rank {self.rank}: {what} failed ({_reason(exc)}); another rank of the run stopped, "
                           f"so this one stops too: no bundle is written") from None

    def backward(self, loss) -> None:
        """``loss.backward()``; under torchrun a peer lost in its collectives is one line (PeerLost)."""
        if not self.active:
            loss.backward()
            return
        self._run("a training step", loss.backward)

    def sum(self, *tensors) -> None:
        """Sum each tensor over the ranks, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            self._run("summing statistics", lambda t=t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order (a list of one on one process)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        self._run("gathering", lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._run("broadcasting", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._run("waiting for the other ranks", dist.barrier)

    # ----------------------------------------------------------------- training steps
    def step(self, params: list, step: Callable, device) -> Callable:
        """``step(x, y) -> {loss terms}`` for the training loop: on one process ``step`` itself;
        on several, the same through ``DistributedDataParallel`` over the parameters being trained
        (rank 0's values broadcast first; gradients averaged over the ranks in backward)."""
        if not self.active:
            return step
        import torch
        from torch import nn

        class Step(nn.Module):
            def __init__(self):
                super().__init__()
                self.trained = nn.ParameterList([p for g in params for p in g["params"] if p.requires_grad])

            def forward(self, x, y):
                return step(x, y)

        ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(Step(), device_ids=ids)
        return lambda x, y: self._run("a training step", lambda: ddp(x, y))



SINGLE = Dist()


def _reason(exc: Exception) -> str:
    """The gist of a Gloo/NCCL error: its first sentence without the source-file prefix."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))
    return text.split(". ")[0][:160]


@functools.lru_cache(maxsize=None)
def _join_function():
    """The autograd function behind :meth:`Dist.join`: forward, an all-gather of every rank's
    rows (padded to the largest part); backward, the all-reduced (summed) gradient of the whole
    batch, of which each rank keeps its own rows."""
    import torch
    import torch.distributed as dist

    class JoinBatch(torch.autograd.Function):
        @staticmethod
        def forward(ctx, mine, sizes):
            ctx.sizes = sizes
            width = max(sizes)
            padded = mine.new_zeros((width,) + tuple(mine.shape[1:]))
            padded[:mine.shape[0]] = mine
            parts = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(parts, padded)
            return torch.cat([p[:k] for p, k in zip(parts, sizes)])

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            start = sum(ctx.sizes[:dist.get_rank()])
            return grad[start:start + ctx.sizes[dist.get_rank()]], None

    return JoinBatch


def requested() -> bool:
    """Whether this process is one of several of a torchrun run (before joining it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun run (or not under torchrun)."""
    return os.environ.get("RANK", "0") in ("0", "")


def from_env(device: str = "auto") -> Dist:
    """The run's :class:`Dist` from torchrun's environment (:data:`SINGLE` without it)."""
    if not requested():
        return SINGLE
    import torch
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    try:  # on GPUs NCCL for CUDA tensors and Gloo for the CPU ones (the statistics are kept on the CPU)
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    except Exception as exc:  # noqa: BLE001 - the rendezvous failed: one line
        raise EdgeclError(f"rank {rank}: cannot join the run's process group ({' '.join(str(exc).split())[:200]}); "
                          f"check torchrun's --nnodes / --rdzv options") from None
    return Dist(rank, world, local, backend)
