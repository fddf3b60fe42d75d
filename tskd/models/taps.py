"""Feature-tap shapes, read from a real forward pass rather than hard-coded per architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def authors_preact(model: nn.Module) -> str:
    """Which tap list stands for "the pre-activation maps" in the authors' code of ``model``'s
    architecture: ``"preact_feats"``, unless the class says otherwise in its ``authors_preact``
    (mdistiller's VGG ignores its ``preact`` flag and returns post-activation maps: ``"feats"``)."""
    return getattr(type(model), "authors_preact", "preact_feats")


def make_taps(feats: list[torch.Tensor], preact_feats: list[torch.Tensor], pooled: torch.Tensor) -> dict:
    """The ``taps`` dict every model's ``forward`` returns next to its logits (see tskd.models.registry)."""
    return {"feats": feats, "preact_feats": preact_feats, "pooled_feat": pooled}


@dataclass(frozen=True)
class TapShapes:
    feats: list[tuple[int, int, int]]  # (C, H, W) of each post-activation tap
    preact_feats: list[tuple[int, int, int]]
    pooled: int  # width of the pooled feature
    num_classes: int


def probe_taps(model: nn.Module, image_size: tuple[int, int], in_channels: int = 3) -> TapShapes:
    """Run one dummy batch through ``model`` (eval mode, no grad) and record its tap shapes."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(2, in_channels, *image_size, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            logits, taps = model(x)
    finally:
        model.train(was_training)
    return TapShapes(
        feats=[tuple(f.shape[1:]) for f in taps["feats"]],
        preact_feats=[tuple(f.shape[1:]) for f in taps["preact_feats"]],
        pooled=int(taps["pooled_feat"].shape[1]),
        num_classes=int(logits.shape[1]),
    )
