"""MobileNetV2 for CIFAR at expansion t=6 and width 0.5 (mdistiller's "mobile_half").

Stem conv3x3 stride 2 (32 -> 16 px), seven stages of inverted residuals, 1x1 conv to 1280
channels, global average pool, linear classifier (``classifier.0``).
Taps (mdistiller): feats = [stem, after stage 1, stage 2, stage 4, stage 6] (0-based stage
indices), i.e. 16x16, 16x16, 8x8, 4x4, 2x2 for a 32x32 input. An inverted residual ends
in a linear (no-ReLU) projection, so these outputs are their own pre-activations:
preact_feats holds the same tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from tskd.models.cifar._common import global_pool, init_conv_bn, make_taps
from tskd.models.registry import register_model

# Per stage: (output channels at width 1, repeats, first stride). The first stage does not
# expand; the second has stride 1 where ImageNet's MobileNetV2 has 2, as CIFAR inputs are small.
_SETTING = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]
_TAP_AFTER = (1, 2, 4, 6)  # stage indices whose outputs are taps


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; identity shortcut when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_shortcut = stride == 1 and in_ch == out_ch
        # Even at expansion 1 the expand conv is kept: the reference checkpoints have it.
        self.conv = nn.Sequential(
            *_conv_bn_relu(in_ch, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the block output (no final activation)."""
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 with expansion ``expansion`` (stages 2-7) and width multiplier ``width``."""

    def __init__(self, expansion: int = 6, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        in_ch = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, in_ch, 3, stride=2))
        self.blocks = nn.ModuleList()
        for stage, (c, n, s) in enumerate(_SETTING):
            out_ch = int(c * width)
            t = 1 if stage == 0 else expansion
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280  # the head never narrows below 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(in_ch, last, 1))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_conv_bn(self)
        nn.init.normal_(self.classifier[0].weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier[0].bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        x = self.conv1(x)
        feats = [x]
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in _TAP_AFTER:
                feats.append(x)
        pooled = global_pool(self.conv2(x))
        return self.classifier(pooled), make_taps(feats, list(feats), pooled)


@register_model("MobileNetV2", small=True)
def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2, t=6, width 0.5 (CRD/mdistiller "mobile_half")."""
    return MobileNetV2(6, 0.5, num_classes)
