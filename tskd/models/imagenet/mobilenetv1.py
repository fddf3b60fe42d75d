"""MobileNetV1 for ImageNet, state-dict compatible with mdistiller's / ReviewKD's definition.

``model``: a conv-BN-ReLU stem (3 -> 32, stride 2), 13 depthwise-separable blocks (3x3
depthwise conv-BN-ReLU, 1x1 conv-BN-ReLU) of widths 64, 128, 128, 256, 256, 512 x 6, 1024, 1024
with strides 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, then a global average pool; ``fc`` 1024 ->
classes. PyTorch's default initialisation, as theirs.

Taps: mdistiller's four, the outputs of blocks 3, 5, 11 and 13 (56, 28, 14, 7 px for a 224 px
input; 128, 256, 512, 1024 channels), led by the stem (112 px, 32 channels) as every model here
leads with its stem, so that ``feats[1:]`` are the four stages, aligned with a ResNet's layers.
Pre-activations are the blocks' last BatchNorm outputs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tskd.models.registry import register_model
from tskd.models.taps import make_taps

# (output width, stride) of the 13 depthwise-separable blocks.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1)]
_TAP_AFTER = (3, 5, 11, 13)  # indices in ``model`` of the blocks whose outputs are taps


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(3, 32, 3, 2))]
        in_ch = 32
        for out_ch, stride in _BLOCKS:
            layers.append(nn.Sequential(*_conv_bn_relu(in_ch, in_ch, 3, stride, groups=in_ch),
                                        *_conv_bn_relu(in_ch, out_ch, 1, 1)))
            in_ch = out_ch
        # Theirs pools with AvgPool2d(7): the global mean at 224 px; this one works at any size.
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        pre = self.model[0][:-1](x)  # every tap: its block without the final ReLU, then the ReLU
        x = F.relu(pre)
        feats, preacts = [x], [pre]
        start = 1
        for end in _TAP_AFTER:
            pre = self.model[end][:-1](self.model[start:end](x))
            x = F.relu(pre)
            feats.append(x)
            preacts.append(pre)
            start = end + 1
        pooled = self.model[-1](x).flatten(1)
        return self.fc(pooled), make_taps(feats, preacts, pooled)


@register_model("MobileNetV1", family="imagenet", small=True)
def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes=num_classes)
