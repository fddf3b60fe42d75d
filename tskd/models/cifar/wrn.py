"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016) as defined in the CRD/mdistiller zoo.

Pre-activation blocks (BN-ReLU-conv), depth 6n+4, widths [16, 16k, 32k, 64k], a final
BN-ReLU before the global pool. Taps follow mdistiller: feats = [stem conv output, stage1,
stage2, stage3] where a stage's output is its last residual sum (a pre-activation network
has no ReLU at the end of a stage); preact_feats = [stem, then each stage output after the
BatchNorm that the next stage (or the head) applies to it, before that ReLU]. Those BN
outputs are taken from the forward pass itself: mdistiller re-applies the BN a second time,
which in training mode would also update its running statistics twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import global_pool, init_conv_bn, make_taps
from tskd.models.registry import register_model


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1 conv (``convShortcut``) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, padding=1, bias=False)
        self.convShortcut = None  # key name kept from the reference so checkpoints load
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, bn1(x))``: the normalised input is the previous stage's preact tap."""
        pre = self.bn1(x)
        act = F.relu(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(act)), inplace=True))
        # When the width changes, the shortcut also sees the activated input (as in the reference).
        out += x if self.convShortcut is None else self.convShortcut(act)
        return out, pre


class WideStage(nn.Module):
    """n wide blocks; the first one changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        blocks = [WideBlock(in_planes, out_planes, stride)]
        blocks += [WideBlock(out_planes, out_planes, 1) for _ in range(n - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, bn1(x) of the first block)``, i.e. the input's preact tap."""
        x, entry_preact = self.layer[0](x)
        for block in self.layer[1:]:
            x, _ = block(x)
        return x, entry_preact


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32x32 inputs."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        f0 = self.conv1(x)
        f1, _ = self.block1(f0)  # block1's entry BN acts on the stem, which is not a stage tap
        f2, p1 = self.block2(f1)
        f3, p2 = self.block3(f2)
        p3 = self.bn1(f3)
        pooled = global_pool(F.relu(p3))
        return self.fc(pooled), make_taps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, num_classes)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, 2, num_classes)
