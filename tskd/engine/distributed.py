"""Data-parallel training over several processes: only what the one training loop needs.

A run whose environment says ``WORLD_SIZE > 1`` (exported by ``tskd.launch`` from submitit's
``TorchDistributedEnvironment``, or set by ``torchrun``) trains as one rank of that world:

* every rank builds the same model (same seed) and draws the same epoch permutation; each
  global batch is cut into contiguous per-rank parts (``RankBatches``), so the union of the
  parts is exactly the single-process batch;
* each rank's mean loss is weighted by its share of the global batch and the gradients are
  summed over ranks (one flat all-reduce): the update is the single-process update;
* BatchNorm normalises with the statistics of the global batch: torch's ``SyncBatchNorm`` on
  CUDA, ``GlobalBatchNorm`` (below) on CPU, where torch's refuses to run;
* only rank 0 writes files and MLflow records.

Results then match a single process with the same global batch up to float rounding (the
reductions add in another order). Random augmentation differs: each rank draws its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from tskd.config import ParamsError


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks of one training run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics, the model file and MLflow records."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


@contextmanager
def process_group(cuda: bool) -> Iterator[World]:
    """Join the process group the environment describes (``env://``); leave it on exit.

    Without ``WORLD_SIZE > 1`` this is a single process. A group that the caller already
    initialised is used as it is and left to the caller.
    """
    if dist.is_available() and dist.is_initialized():
        yield World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        yield SINGLE
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        # One GPU per rank; the launcher usually narrows CUDA_VISIBLE_DEVICES to one already.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    try:
        yield World(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        dist.destroy_process_group()


def part_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous part when n items are cut into size balanced parts."""
    q, r = divmod(n, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


class RankBatches(Sampler[list[int]]):
    """This rank's part of every batch that ``batches`` yields (a batch sampler)."""

    def __init__(self, batches: Iterable[list[int]], world: World):
        self.batches = batches
        self.world = world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) < self.world.size:
                # An empty part cannot be collated; every rank must take part in every step.
                raise ParamsError(f"a batch of {len(batch)} images cannot be shared by {self.world.size} "
                                 "processes: change the batch size or the number of tasks")
            lo, hi = part_bounds(len(batch), self.world.rank, self.world.size)
            yield batch[lo:hi]


def global_batch_size(step: int, batch_size: int, num_items: int) -> int:
    """Size of batch ``step`` of an epoch over ``num_items`` (the last one may be short)."""
    return min(batch_size, num_items - step * batch_size)


def sum_gradients(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients over ranks in place, in one flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_values(values: Sequence[float]) -> list[float]:
    """Sum a few numbers (epoch totals) over ranks."""
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) that autograd sees through: the backward sums the gradients too."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on CPU (gloo).

    Same parameters, buffers and state_dict keys as the layer it replaces. In eval mode, or
    outside a process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _SumOverRanks.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / n  # two passes, as precise as plain BatchNorm
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, GlobalBatchNorm | nn.SyncBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # the same Parameter objects
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _to_global_batchnorm(child))
    return module


def sync_batchnorm(module: nn.Module, world: World, cuda: bool) -> nn.Module:
    """Make every BatchNorm in ``module`` normalise over the global batch (no-op for one process)."""
    if not world.distributed:
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module) if cuda else _to_global_batchnorm(module)
