"""ImageNet-style ResNet-18/50 adapted to CIFAR (CRD's ``resnetv2``): 3x3 stem at full resolution.

Stem conv3x3-BN-ReLU (64 channels, no max-pool), four stages at strides 1, 2, 2, 2 with
basic (18) or bottleneck (50) blocks and 1x1 conv-BN ``shortcut`` where the shape changes.
Taps (mdistiller): feats = [stem, stage1..stage4] (32, 32, 16, 8, 4 px); preact_feats =
[stem, then each stage's output before its final ReLU].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import Stage, global_pool, init_conv_bn, make_taps
from tskd.models.registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential, no state) unless the shape changes, then 1x1 conv + BN."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(relu(preact), preact)`` where ``preact`` is the residual sum."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        preact = self.bn2(self.conv2(out))
        preact += self.shortcut(x)
        return F.relu(preact), preact


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(relu(preact), preact)`` where ``preact`` is the residual sum."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        preact = self.bn3(self.conv3(out))
        preact += self.shortcut(x)
        return F.relu(preact), preact


class ResNetV2(nn.Module):
    """Four-stage ResNet (64-128-256-512 base widths) built from ``block`` with ``units`` per stage."""

    def __init__(self, block: type[BasicBlock | Bottleneck], units: tuple[int, ...], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), units, strict=True), start=1):
            stride = 1 if i == 1 else 2
            blocks = [block(in_planes, planes, stride)]
            in_planes = planes * block.expansion
            blocks += [block(in_planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i}", Stage(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        f4, p4 = self.layer4(f3)
        pooled = global_pool(f4)
        return self.linear(pooled), make_taps([f0, f1, f2, f3, f4], [f0, p1, p2, p3, p4], pooled)


@register_model("ResNet18")
def resnet18(num_classes: int = 100) -> ResNetV2:
    """ResNet-18 (basic blocks, 2-2-2-2), CIFAR stem."""
    return ResNetV2(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("ResNet50")
def resnet50(num_classes: int = 100) -> ResNetV2:
    """ResNet-50 (bottleneck blocks, 3-4-6-3), CIFAR stem."""
    return ResNetV2(Bottleneck, (3, 4, 6, 3), num_classes)
