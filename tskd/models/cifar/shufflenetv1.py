"""ShuffleNetV1 for CIFAR (g=3, stage widths 240/480/960, 4/8/4 units), CRD/mdistiller layout.

Stem conv1x1 to 24 channels + BN + ReLU at full resolution; every stage opens with a stride-2
unit whose output is the concatenation of its residual branch and a 3x3 average-pooled input.
Taps (mdistiller): feats = [stem, stage1, stage2, stage3] (32, 16, 8, 4 px); preact_feats =
[stem, then each stage's output before its final ReLU].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import Stage, channel_shuffle, global_pool, make_taps
from tskd.models.registry import register_model

_STEM = 24


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1 bottleneck (``out_planes`` new channels)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int):
        super().__init__()
        mid = out_planes // 4
        # The 24-channel stem output is too narrow to split into groups: the first unit's 1x1 is dense.
        self.groups1 = 1 if in_planes == _STEM else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(relu(preact), preact)``; stride 2 concatenates, stride 1 adds the shortcut."""
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.groups1 > 1:
            out = channel_shuffle(out, self.groups1)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            preact = torch.cat([out, F.avg_pool2d(x, kernel_size=3, stride=2, padding=1)], 1)
        else:
            preact = out + x
        return F.relu(preact), preact


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 with ``groups`` groups, stage output widths ``widths`` and ``units`` per stage."""

    def __init__(self, widths: tuple[int, ...], units: tuple[int, ...], groups: int, num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, _STEM, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM)
        in_planes = _STEM
        for i, (width, n) in enumerate(zip(widths, units, strict=True), start=1):
            # The stride-2 unit only adds width - in_planes channels: the pooled input fills the rest.
            blocks = [ShuffleUnit(in_planes, width - in_planes, 2, groups)]
            blocks += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", Stage(*blocks))
            in_planes = width
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        f0 = F.relu(self.bn1(self.conv1(x)))
        f1, p1 = self.layer1(f0)
        f2, p2 = self.layer2(f1)
        f3, p3 = self.layer3(f2)
        pooled = global_pool(f3)
        return self.linear(pooled), make_taps([f0, f1, f2, f3], [f0, p1, p2, p3], pooled)


@register_model("ShuffleV1", small=True)
def shufflev1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNetV1, g=3, widths 240/480/960, 4/8/4 units."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)
