"""Device, precision and seeding: decided once, here, for the whole run."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from tskd.config import ParamsError, TrainCfg


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: Callable[[], AbstractContextManager]
    precision: str


def uses_cuda(cfg: TrainCfg) -> bool:
    """Whether the run trains on CUDA: asked for, or ``auto`` with a device present."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("train.device: 'cuda' was asked for but no CUDA device is available")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def select_runtime(cfg: TrainCfg) -> Runtime:
    """CUDA when present (or asked), else CPU; bf16 autocast only where it is real (CUDA)."""
    use_cuda = uses_cuda(cfg)
    device = torch.device("cuda" if use_cuda else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        # Bit-exact resume needs deterministic kernels; cuDNN autotuning would pick different ones.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if use_cuda and cfg.precision == "bf16":
        return Runtime(device, lambda: torch.autocast("cuda", dtype=torch.bfloat16), "bf16")
    return Runtime(device, contextlib.nullcontext, "fp32")


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
