"""ShuffleNetV2 (1x: widths 116/232/464, head 1024, 3/7/3 units) for CIFAR, CRD/mdistiller layout.

Stem conv1x1 to 24 channels + BN + ReLU at full resolution; each stage is a stride-2 down
unit followed by ``n`` split units; 1x1 conv to 1024 channels + BN + ReLU, global pool, linear.
Taps (mdistiller): feats = [stem, stage1, stage2, stage3] (32, 16, 8, 4 px); preact_feats =
[stem, then each stage's output before its final ReLU]. Unlike mdistiller, whose preact
skips the last channel shuffle, ours is channel-aligned with feats (relu(preact) == feat).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import Stage, channel_shuffle, global_pool, make_taps
from tskd.models.registry import register_model

_STEM = 24


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    groups = in_ch if depthwise else 1
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class SplitUnit(nn.Module):
    """Keep half the channels, run 1x1 - depthwise 3x3 - 1x1 on the other half, concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = _conv(half, half, 1)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = _conv(half, half, 3, depthwise=True)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = _conv(half, half, 1)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(relu(preact), preact)``."""
        half = x.shape[1] // 2
        kept, branch = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(branch)), inplace=True)
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # The reference applies the ReLU to the branch only; the kept half is already >= 0
        # (every unit ends in a ReLU), so shuffling first and applying one ReLU to the whole
        # gives the same values and gradients and leaves a preact aligned with the output.
        preact = channel_shuffle(torch.cat([kept, out], 1), 2)
        return F.relu(preact), preact


class DownUnit(nn.Module):
    """Stride-2 unit: two branches (depthwise-first and 1x1-first), concatenated and shuffled."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        # left branch
        self.conv1 = _conv(in_ch, in_ch, 3, stride=2, depthwise=True)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv2 = _conv(in_ch, mid, 1)
        self.bn2 = nn.BatchNorm2d(mid)
        # right branch
        self.conv3 = _conv(in_ch, mid, 1)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _conv(mid, mid, 3, stride=2, depthwise=True)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _conv(mid, mid, 1)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, out)``: a down unit never ends a stage, so its preact is never a tap."""
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))), inplace=True)
        right = F.relu(self.bn3(self.conv3(x)), inplace=True)
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))), inplace=True)
        out = channel_shuffle(torch.cat([left, right], 1), 2)
        return out, out


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 with stage widths ``widths[:3]``, head width ``widths[3]``, ``units`` per stage."""

    def __init__(self, widths: tuple[int, ...], units: tuple[int, ...], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        in_ch = _STEM
        for i, (width, n) in enumerate(zip(widths[:3], units, strict=True), start=1):
            self.add_module(f"layer{i}", Stage(DownUnit(in_ch, width), *[SplitUnit(width) for _ in range(n)]))
            in_ch = width
        self.conv2 = nn.Conv2d(in_ch, widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        pooled = global_pool(F.relu(self.bn2(self.conv2(f3))))
        return self.linear(pooled), make_taps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


@register_model("ShuffleV2", small=True)
def shufflev2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNetV2 1x: widths 116/232/464, head 1024, 3/7/3 units."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
