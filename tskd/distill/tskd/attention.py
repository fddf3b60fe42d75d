"""Attention maps and knowledge increments (docs/method.md, "The review loss")."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AtNorm = Literal["column", "flat"]


def attention_map(x: Tensor, norm: AtNorm = "column") -> Tensor:
    """``normalize(mean_c(x^2))`` of a (B, C, H, W) map, as (B, 1, H, W).

    ``column``: L2-normalise along H for every column, which is what the authors'
    ``F.normalize`` (default ``dim=1``) does on the (B, H, W) map. ``flat``: L2-normalise
    over all H*W positions, as in classic attention transfer (Zagoruyko & Komodakis).
    """
    # float32: under bf16 autocast, squares and norms of features lose too many bits.
    x = x.float()
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # Channels innermost (the snapshots run so): the norm reduces each pixel's channels in
        # one read, where pow + mean would write and re-read a full-size temporary, 2-3x slower
        # on CPU. The same value up to rounding; for NCHW, pow + mean is the faster one.
        a = torch.linalg.vector_norm(x, dim=1).square() / x.shape[1]
    else:
        a = x.pow(2).mean(1)
    a = F.normalize(a, dim=1) if norm == "column" else F.normalize(a.flatten(1), dim=1).view_as(a)
    return a.unsqueeze(1)


def increment_sequence(memory: list[Tensor], current: Tensor) -> Tensor:
    """``[|M1-M2|, ..., |M(k-1)-Mk|, |S-Mk|]`` stacked in time order: (k, B, 1, H, W).

    ``memory`` holds the k snapshot maps oldest first; ``current`` is the student's map S.
    """
    frames = [*memory, current]
    return torch.stack([(a - b).abs() for a, b in zip(frames[:-1], frames[1:], strict=True)])
