"""Weight files for the detectors: torchvision's detection state dicts and ImageNet backbones, strictly.

Our loaders compare a file's keys and shapes with the model's *before* loading, to name every
key that differs. A few torchvision modules rewrite keys while loading, so the comparison must
see the keys as those modules will (``torchvision_keys``):

* ``FrozenBatchNorm2d`` drops ``num_batches_tracked``, which files saved from a BatchNorm2d
  model (an ImageNet classifier, a detector built without pretrained weights) carry;
* ``RPNHead`` and ``FeaturePyramidNetwork`` (state-dict version < 2: every file we read, as the
  version travels in metadata our readers drop) rename their conv keys of torchvision < 0.13,
  the layout of the ``COCO_V1`` files: ``rpn.head.conv.weight`` -> ``rpn.head.conv.0.0.weight``,
  ``fpn.inner_blocks.0.weight`` -> ``fpn.inner_blocks.0.0.weight`` (likewise ``layer_blocks``).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from tskd.models.published import _SHOW, ModelFileError, _read, _state_dict_from

# Where a torchvision classifier's keys sit relative to a detection backbone's body, and the
# classifier head the body does not have.
_BODY_PREFIX = {"mobilenet_v2": "features."}  # ResNets: the body has the classifier's own keys
_HEAD_PREFIX = {"mobilenet_v2": "classifier."}  # ResNets: "fc."


def torchvision_keys(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with the key rewrites ``model``'s torchvision modules make while loading (see
    the module docstring) already made: the keys ``load_state_dict(strict=True)`` will check."""
    out = dict(state_dict)
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        if isinstance(module, FrozenBatchNorm2d):
            out.pop(f"{prefix}num_batches_tracked", None)
        elif isinstance(module, RPNHead):
            _rename(out, f"{prefix}conv.", f"{prefix}conv.0.0.")
        elif isinstance(module, FeaturePyramidNetwork):
            for block in ("inner_blocks", "layer_blocks"):
                for i in range(len(getattr(module, block))):
                    _rename(out, f"{prefix}{block}.{i}.", f"{prefix}{block}.{i}.0.")
    return out


def _rename(state_dict: dict[str, Tensor], old: str, new: str) -> None:
    for kind in ("weight", "bias"):
        if f"{old}{kind}" in state_dict and f"{new}{kind}" not in state_dict:
            state_dict[f"{new}{kind}"] = state_dict.pop(f"{old}{kind}")


def load_backbone_weights(model: nn.Module, path: str | Path) -> None:
    """Load the torchvision ImageNet classifier in ``path`` (``resnet18/50/101`` or ``mobilenet_v2``
    ``.pth``, the arch of ``model.backbone_name``) into ``model``'s backbone body, strictly.

    Only the classifier head (``fc.*`` / ``classifier.*``) may be absent from the body; any other
    missing, unexpected or reshaped key raises ``ModelFileError`` naming the file and the keys.
    The FPN, RPN and RoI head keep their initialisation; frozen layers stay frozen.
    """
    path = Path(path)
    arch = model.backbone_name
    state_dict, _ = _state_dict_from(_read(path), path)
    body = model.backbone.body
    head, prefix = _HEAD_PREFIX.get(arch, "fc."), _BODY_PREFIX.get(arch, "")
    # body key -> the file's key for it (a key outside ``prefix`` keeps its name: it fits nothing)
    file_key = {k.removeprefix(prefix): k for k in state_dict if not k.startswith(head)}
    found = torchvision_keys(body, {b: state_dict[k] for b, k in file_key.items()})
    expected = {k: tuple(v.shape) for k, v in body.state_dict().items()}
    missing = sorted(prefix + k for k in expected.keys() - found.keys())
    unexpected = sorted(file_key[k] for k in found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != tuple(found[k].shape))
    if missing or unexpected or reshaped:
        lines = [f"backbone weights {path} do not fit the {arch} body of this detector with strict=True "
                 f"(a torchvision {arch} ImageNet classifier file is expected):"]
        if missing:
            lines.append(f"  {len(missing)} missing keys, e.g. {', '.join(missing[:_SHOW])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:_SHOW])}")
        if reshaped:
            shown = ", ".join(f"{prefix}{k} file {list(found[k].shape)} vs model {list(expected[k])}"
                              for k in reshaped[:_SHOW])
            lines.append(f"  {len(reshaped)} keys with other shapes, e.g. {shown}")
        raise ModelFileError("\n".join(lines))
    body.load_state_dict(found, strict=True)
