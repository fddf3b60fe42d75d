"""VGG with BatchNorm for CIFAR, as defined in the CRD/mdistiller zoo.

Five blocks of conv3x3(+bias)-BN-ReLU layers; each block's last ReLU is applied in
``forward`` so its input is available as the preact tap. Max-pools sit between blocks
0-1, 1-2 and 2-3; the one between blocks 3 and 4 is used only when the map is still larger
than 4x4 (64-px inputs), so on CIFAR block 4 runs at 4x4 like block 3. Global average pool
and one linear layer.
Taps (mdistiller): feats = the five block outputs after ReLU; preact_feats = the same before
the ReLU, except that the first entry is block 0's post-ReLU output, as in mdistiller.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tskd.models.cifar._common import global_pool, init_conv_bn, make_taps
from tskd.models.registry import register_model

# Output width of every conv layer, per block.
_CONFIGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def _block(in_channels: int, widths: list[int]) -> nn.Sequential:
    """conv-BN-ReLU per width, without the final ReLU (``forward`` applies it)."""
    layers: list[nn.Module] = []
    for w in widths:
        conv = nn.Conv2d(in_channels, w, kernel_size=3, padding=1)
        layers += [conv, nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN with five conv blocks ``block0`` ... ``block4`` and a linear ``classifier``."""

    # The authors' VGG (mdistiller's) ignores its ``preact`` flag: where their code asks a network
    # for pre-activation maps, this one gives the post-activation ones (tskd.models.taps.authors_preact).
    authors_preact: ClassVar[str] = "feats"

    def __init__(self, config: list[list[int]], num_classes: int = 100):
        super().__init__()
        in_channels = 3
        for i, widths in enumerate(config):
            self.add_module(f"block{i}", _block(in_channels, widths))
            in_channels = widths[-1]
        self.classifier = nn.Linear(in_channels, num_classes)
        init_conv_bn(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Return ``(logits, taps)``; see the module docstring for the taps."""
        blocks = [self.block0, self.block1, self.block2, self.block3, self.block4]
        feats, preacts = [], []
        for i, block in enumerate(blocks):
            if 0 < i < 4 or (i == 4 and x.shape[-1] > 4):
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            pre = block(x)
            x = F.relu(pre)
            feats.append(x)
            preacts.append(x if i == 0 else pre)
        pooled = global_pool(x)
        return self.classifier(pooled), make_taps(feats, preacts, pooled)


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BatchNorm (one conv per block)."""
    return VGG(_CONFIGS["vgg8"], num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BatchNorm (configuration A)."""
    return VGG(_CONFIGS["vgg11"], num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BatchNorm (configuration B)."""
    return VGG(_CONFIGS["vgg13"], num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BatchNorm (configuration D)."""
    return VGG(_CONFIGS["vgg16"], num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BatchNorm (configuration E)."""
    return VGG(_CONFIGS["vgg19"], num_classes)
