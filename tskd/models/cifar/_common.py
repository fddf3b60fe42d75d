"""Small helpers shared by the CIFAR model families."""

from __future__ import annotations

import torch
from torch import nn

from tskd.models.taps import make_taps

__all__ = ["Stage", "channel_shuffle", "global_pool", "init_conv_bn", "make_taps"]


def init_conv_bn(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions with zero bias, BatchNorm scale 1 / shift 0.

    This is the initialisation the CRD/mdistiller CIFAR zoo uses for every family that
    initialises explicitly; ``normal_(0, sqrt(2 / (k*k*out)))`` there is the same
    distribution as Kaiming fan-out.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over all spatial positions: (B, C, H, W) -> (B, C).

    The reference code uses fixed-size average pools (8x8, 4x4, ...) that cover the
    whole last map for 32x32 inputs; a global mean is the same there and also works
    for other input sizes.
    """
    return x.mean(dim=(2, 3))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: interleave the channels of ``groups`` equal groups."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Sequential):
    """Blocks run in order, each returning ``(out, preact)``; the stage returns the last pair.

    Blocks hand back the tensor they apply their final ReLU to (no copy), so the stage's
    pre-activation tap is free; the earlier blocks' ones are dropped as soon as the next runs.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the last block's ``(out, preact)``."""
        preact = x
        for block in self:
            x, preact = block(x)
        return x, preact
