"""Data-parallel training over several processes: only what the one training loop needs.

A run whose environment says ``WORLD_SIZE > 1`` (exported by ``tskd.launch`` from submitit's
``TorchDistributedEnvironment``, or set by ``torchrun``) trains as one rank of that world:

* every rank builds the same model (same seed) and draws the same epoch permutation; each
  global batch is cut into contiguous per-rank parts (``RankBatches``), so the union of the
  parts is exactly the single-process batch;
* the training step runs in torch's DistributedDataParallel (``train_step``); each rank's mean
  loss is weighted by its share of the global batch (``loss_scale``), so the update is the
  single-process update;
* BatchNorm normalises with the statistics of the global batch (``recipes.<r>.batchnorm:
  global``, the default): torch's ``SyncBatchNorm`` on CUDA, ``GlobalBatchNorm`` (below) on CPU,
  where torch's refuses to run; ``per_rank`` keeps each rank's own statistics, as the published
  multi-GPU ImageNet recipes do;
* only rank 0 writes files and MLflow records;
* what a method keeps across steps is updated from the global batch (CRD's memory banks and
  normalising constants: ``gather_rows``, ``global_mean``), so every rank holds the same state.

Results then match a single process with the same global batch up to float rounding (the
reductions add in another order). Each image's augmentation is drawn from (epoch, image), so
the ranks crop and flip as one process would; what methods draw per step (CRD's negatives)
is each rank's own.
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

from tskd.errors import ParamsError


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


class TrainStep(nn.Module):
    """A method's training forward (``forward_train``) as a module's ``forward``: what torch's
    DistributedDataParallel wraps (a distiller's own ``forward`` is the student's inference)."""

    def __init__(self, distiller: nn.Module):
        super().__init__()
        self.distiller = distiller

    def forward(self, inputs, targets, epoch: int, indices=None):
        return self.distiller.forward_train(inputs, targets, epoch, indices=indices)


def train_step(distiller: nn.Module, world: World, device: torch.device, *, every_parameter_every_step: bool
               ) -> nn.Module:
    """The module the loop calls for a training step: ``TrainStep``, in torch's
    DistributedDataParallel when there are several ranks. DDP all-reduces the gradients in
    buckets while the backward still runs, and averages them over ranks (``loss_scale`` makes that
    the global batch's mean).

    ``broadcast_buffers`` is off: BatchNorm statistics are global or deliberately per rank (the
    recipe's ``batchnorm``), and a method's buffers are kept identical by the method (CRD's banks:
    broadcasting 2 x 1.28 M x 128 floats per step would cost more than the step). A method whose
    modules sit out some steps (TSKD's forecasters outside review epochs) makes DDP look for
    unused parameters after each forward.
    """
    step = TrainStep(distiller)
    if not world.distributed:
        return step
    from torch.nn.parallel import DistributedDataParallel

    # process_group() made this rank's GPU the current one; the run's device is plain "cuda".
    gpu = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=gpu,
                                   broadcast_buffers=False, find_unused_parameters=not every_parameter_every_step)


def loss_scale(world: World, part: int, global_batch: int) -> float:
    """The factor on a rank's mean loss that makes DDP's averaged gradient the gradient of the global
    batch's mean loss: this rank's share of the batch, times the number of ranks DDP divides by."""
    return world.size * part / global_batch


def sum_values(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sum a few numbers (epoch totals) over ranks. The tensor lives on the run's device: NCCL, the
    backend of CUDA runs, reduces CUDA tensors only."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def active() -> bool:
    """Whether this process is one of several ranks (a method asks, to gather what one process sees)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t``, concatenated in rank order: the global batch's, when each rank holds
    its contiguous part. Parts may differ in length (the last batch of an epoch)."""
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def global_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t``'s elements over every rank's ``t`` (float64 sums)."""
    totals = torch.stack([t.double().sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).to(t.dtype)


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """Whether ``flag`` (a bool tensor on the run's device) is true on any rank."""
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.bool()


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
