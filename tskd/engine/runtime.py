"""Device, precision, layout and seeding: decided once, here, for the whole run.

What ``train.deterministic: true`` guarantees
---------------------------------------------
On CPU (where the trainer also calls ``torch.use_deterministic_algorithms(True)``) a run is
bit-exact: a run resumed at an epoch boundary replays exactly what an uninterrupted run does.

On CUDA it guarantees less. cuDNN is held to deterministic convolution algorithms, picked
without autotuning (``cudnn.deterministic = True``, ``cudnn.benchmark = False``), and the data
order and every RNG stream are replayed from (seed, epoch) as on CPU (``seed_epoch``). Exact
resume, though, holds on CPU only unless *every* kernel of a step is deterministic, and torch's
documentation of ``torch.use_deterministic_algorithms`` (torch 2.14) lists, among the CUDA
kernels that are not, some that these models and losses run:

* ``AdaptiveAvgPool2d`` backward (``F.adaptive_avg_pool2d`` of a tensor that needs a gradient):
  AT and ReviewKD pool the student's feature maps. It has no deterministic CUDA version (with
  ``use_deterministic_algorithms(True)`` it raises). TSKD pools only the teacher's maps, under
  ``no_grad``: the forward alone, which is deterministic.
* ``Tensor.index_copy`` (CRD's memory-bank update), and ``gather``/``index_select``/``index_add``
  /``scatter_add_`` (the backward of indexing a tensor that needs a gradient): deterministic on
  CUDA only under ``use_deterministic_algorithms(True)``.
* ``Conv2d`` on CUDA: listed too, and made deterministic by ``cudnn.deterministic`` (set here).
* ``NLLLoss`` on CUDA is listed as well; in torch's source that is the spatial (N, C, H, W)
  kernel, whose reduction uses atomics. ``F.cross_entropy`` of (B, C) logits, every method's CE
  term, runs the 1-D kernel, which is not flagged.

Beyond that list, cuBLAS matmuls (the classifiers, CRD's embeddings and ``bmm``) are
deterministic only with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (torch's reproducibility notes), and
the Triton kernels of ``methods.tskd.compile: true`` may reduce in a varying order. The trainer
turns ``use_deterministic_algorithms`` on for CPU runs only, so a CUDA run resumed from a
checkpoint continues from the same state with the same batches, but its floating-point sums may
differ from the uninterrupted run's in the last bits, and the two runs drift apart slowly.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tskd.errors import ParamsError
from tskd.spec.config import TrainCfg

# TF32 (a 10-bit mantissa in fp32 matmuls and convolutions) on CUDA is ``train.tf32``. Its default,
# on, is the authors' behaviour: torch 1.7-1.11 (theirs: 1.9) enabled it for matmuls and cuDNN on
# Ampere and newer. Off, fp32 means IEEE fp32 on a GPU as on a CPU (benchmarks/gpu_check.py
# compares the two so). Under bf16 autocast the convolutions and matmuls run in bf16 anyway; TF32
# reaches only the fp32 islands the code keeps on purpose (CRD's contrast).


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    precision: str
    # channels_last (NHWC) for whole networks and their 4-D inputs, set on CUDA: cuDNN's bf16
    # tensor-core convolutions work in NHWC, so NCHW tensors would be transposed around every
    # convolution. An fp32 CUDA run keeps the same layout, so it differs from a bf16 run in
    # precision alone.
    channels_last: bool = False

    def place(self, module: nn.Module) -> nn.Module:
        """``module`` on the run's device (in place, returned), in channels_last where the run uses it.

        ``Module.to(memory_format=...)`` re-lays only 4-D parameters and buffers (convolution
        weights); a Distiller's hidden teacher follows through its ``_apply``."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def place_batch(self, x: torch.Tensor) -> torch.Tensor:
        """An input tensor on the run's device; 4-D images in channels_last where the run uses it.

        On CUDA the copy is ``non_blocking`` (asynchronous from pinned memory, so the copy of a
        batch overlaps the kernels queued before it). ``select_runtime`` uses channels_last on
        CUDA only, so on CPU this is a plain ``.to(device)``, a no-op for a tensor already there."""
        # non_blocking only towards CUDA: a non-blocking copy *to* the CPU may be read before it lands.
        kw = {"non_blocking": True} if self.device.type == "cuda" else {}
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, memory_format=torch.channels_last, **kw)
        return x.to(self.device, **kw)


def uses_cuda(cfg: TrainCfg) -> bool:
    """Whether the run trains on CUDA: asked for, or ``auto`` with a device present."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' was asked for but no CUDA device is available")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def select_runtime(cfg: TrainCfg) -> Runtime:
    """CUDA when present (or asked), else CPU; bf16 autocast only where it is real (CUDA).

    On CUDA also: TF32 as ``train.tf32`` says, cuDNN autotuning unless ``deterministic``, and
    channels_last networks and inputs (``Runtime.place``/``place_batch``). See the module's
    docstring for what ``deterministic`` does and does not guarantee there."""
    use_cuda = uses_cuda(cfg)
    device = torch.device("cuda" if use_cuda else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # Bit-exact resume needs deterministic kernels; cuDNN autotuning would pick different ones.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif use_cuda:
        # Autotuning: cuDNN times its algorithms for each new input shape once and keeps the fastest.
        # A CIFAR/ImageNet run has a handful of shapes (the batch, the last partial batch, eval),
        # so the one-off timing is repaid many times; the pick may differ from run to run.
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    if not use_cuda:
        # CPU: fp32 whatever train.precision says. CPU autocast adds a cast around every op and,
        # without bf16 matrix units, runs slower than plain fp32; and the reference numbers were
        # trained in fp32.
        return Runtime(device, contextlib.nullcontext, "fp32")
    # TF32 flags are set on CUDA only: a CPU run leaves them as it found them.
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    if cfg.precision == "bf16":
        # including_emulation=False: a pre-Ampere GPU can store bf16 but computes it through fp32
        # emulation, slower than fp32 itself; that is not what bf16 was asked for.
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            raise ParamsError(f"train.precision: 'bf16' needs a GPU with native bfloat16 (compute capability "
                              f">= 8.0, Ampere or newer); {name} has none. Set train.precision: fp32")
        return Runtime(device, lambda: torch.autocast("cuda", dtype=torch.bfloat16), "bf16", channels_last=True)
    return Runtime(device, contextlib.nullcontext, "fp32", channels_last=True)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**31


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseed every RNG from (seed, epoch) and return the data-order generator.

    Seeding per epoch makes an epoch's randomness independent of what ran before it,
    so a run resumed at an epoch boundary replays exactly what an uninterrupted run does.
    In a data-parallel run every rank gets the same data-order generator (they share one
    permutation) but ranks other than 0 draw their own augmentation and model randomness.
    """
    s = epoch_seed(seed, epoch)
    local = s if rank == 0 else epoch_seed(s, rank)
    random.seed(local)
    np.random.seed(local)
    torch.manual_seed(local)
    g = torch.Generator()
    g.manual_seed(s)
    return g
