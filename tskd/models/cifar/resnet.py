"""CIFAR ResNets (He et al. 2016, the 6n+2 family) as defined in the CRD/mdistiller zoo.

Stem conv3x3-BN-ReLU, three stages of n basic blocks at strides 1, 2, 2, a 1x1 conv + BN
shortcut wherever the shape changes, global average pool, linear classifier.
Taps (32x32 input): feats = [stem, stage1, stage2, stage3]; preact_feats is the same with
each stage's output taken before its final ReLU (the stem entry is the stem output itself,
as in mdistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import Stage, global_pool, init_conv_bn, make_taps
from tskd.models.registry import register_model

_NARROW = (16, 16, 32, 64)  # resnet8 ... resnet110
_WIDE = (32, 64, 128, 256)  # the "x4" variants


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN ``downsample``) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(relu(preact), preact)`` where ``preact`` is the residual sum."""
        # In-place ops are safe here: BatchNorm's backward needs its input, not its output.
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        preact = self.bn2(self.conv2(out))
        preact += x if self.downsample is None else self.downsample(x)
        return F.relu(preact), preact


class CifarResNet(nn.Module):
    """ResNet-``depth`` for 32x32 inputs; ``widths`` = (stem, stage1, stage2, stage3) channels."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        init_conv_bn(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> Stage:
        blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
        return Stage(*blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        pooled = global_pool(f3)
        return self.fc(pooled), make_taps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8, widths 16-16-32-64."""
    return CifarResNet(8, _NARROW, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14, widths 16-16-32-64."""
    return CifarResNet(14, _NARROW, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20, widths 16-16-32-64."""
    return CifarResNet(20, _NARROW, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32, widths 16-16-32-64."""
    return CifarResNet(32, _NARROW, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44, widths 16-16-32-64."""
    return CifarResNet(44, _NARROW, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56, widths 16-16-32-64."""
    return CifarResNet(56, _NARROW, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110, widths 16-16-32-64."""
    return CifarResNet(110, _NARROW, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 with 4x wider stages, widths 32-64-128-256."""
    return CifarResNet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with 4x wider stages, widths 32-64-128-256."""
    return CifarResNet(32, _WIDE, num_classes)
