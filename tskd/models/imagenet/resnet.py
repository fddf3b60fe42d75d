"""torchvision's ResNet-18/34/50, unmodified, with the taps distillers read.

The network is torchvision's own class and forward, so its state-dict keys are torchvision's
and its weight files (``IMAGENET1K_V1``) load with ``strict=True``. The taps are taken by
forward hooks, in mdistiller's layout for ImageNet ResNets:

* ``feats``: the stem after its ReLU (112 px for a 224 px input, before the max-pool), then
  the outputs of layer1..layer4 (56, 28, 14, 7 px);
* ``preact_feats``: the same before their final ReLU: the stem's BatchNorm output and each
  layer's residual sum, the input of the last call of ``layerX[-1].relu``;
* ``pooled_feat``: the input of ``fc``.

torchvision's blocks call one in-place ReLU module two (BasicBlock) or three (Bottleneck)
times, and its stem ReLU is in place too: the tensor a pre-activation hook sees would be
overwritten by that very ReLU. Those few ReLU modules are switched to ``inplace=False`` (an
attribute, not code: same values, same state dict), so their inputs survive without a copy.
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from tskd.models.registry import register_model
from tskd.models.taps import make_taps


class TappedResNet(ResNet):
    """torchvision's ``ResNet`` whose forward also returns the feature taps: ``(logits, taps)``."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__(block, layers, num_classes=num_classes)
        self._seen: dict[str, Tensor] = {}
        self._hooked(self.relu, "stem")
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), 1):
            self._hooked(layer[-1].relu, f"layer{i}")  # its last call in a forward wins
        # Hooks are partials of module-level functions, not closures: a deep copy of the model
        # (TSKD's snapshot runner) then records into its own copy of ``_seen``.
        self.fc.register_forward_pre_hook(partial(_record_input, self._seen, "pooled"))

    def _hooked(self, relu: nn.ReLU, name: str) -> None:
        relu.inplace = False  # see the module docstring
        relu.register_forward_hook(partial(_record, self._seen, name))

    def forward(self, x: Tensor) -> tuple[Tensor, dict]:
        self._seen.clear()
        logits = super().forward(x)
        seen, names = self._seen, ["stem", "layer1", "layer2", "layer3", "layer4"]
        taps = make_taps([seen[f"{n}.post"] for n in names], [seen[f"{n}.pre"] for n in names], seen["pooled"])
        self._seen.clear()  # no reference to this batch's activations outlives the call
        return logits, taps


def _record(seen: dict[str, Tensor], name: str, module: nn.Module, args: tuple[Tensor], out: Tensor) -> None:
    seen[f"{name}.pre"], seen[f"{name}.post"] = args[0], out


def _record_input(seen: dict[str, Tensor], name: str, module: nn.Module, args: tuple[Tensor]) -> None:
    seen[name] = args[0]


# Block type and blocks per layer: the architectures' definitions (He et al. 2016), as torchvision builds them.
_ARCHS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
          "resnet50": (Bottleneck, [3, 4, 6, 3])}


def _factory(name: str):
    block, layers = _ARCHS[name]

    def build(num_classes: int = 1000) -> TappedResNet:
        return TappedResNet(block, layers, num_classes=num_classes)

    build.__name__ = name
    return build


for _name in _ARCHS:
    register_model(_name, family="imagenet")(_factory(_name))
