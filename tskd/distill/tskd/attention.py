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


def raw_sequence(memory: list[Tensor], current: Tensor) -> Tensor:
    """``[M2, ..., Mk, S]``, the maps themselves: (k, B, 1, H, W), oldest first.

    As many frames as ``increment_sequence`` (k), so that the forecaster runs the same number of
    steps and costs the same; the oldest snapshot M1 is the one left out (the increments hold it only
    through ``|M1-M2|``). The last frame is the current map S, as ``|S-Mk|`` is the increments' last:
    the frame the student's gradient flows through. With k = 1 the sequence is S alone.
    """
    return torch.stack([*memory[1:], current])


ReviewTarget = Literal["dynamic", "static", "signed"]


def review_target(s: Tensor, t: Tensor, kind: ReviewTarget) -> Tensor:
    """What the forecast is pulled towards: ``|S-T|`` (dynamic, the authors'), the teacher's map ``T``
    (static: no gradient reaches the student through it) or ``S-T`` (signed: negative where the
    teacher attends more)."""
    if kind == "dynamic":
        return (s - t).abs()
    return t if kind == "static" else s - t
