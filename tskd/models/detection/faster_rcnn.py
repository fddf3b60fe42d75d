"""torchvision's Faster R-CNN + FPN, unmodified, with the entry points detection distillers need.

``DistillableFasterRCNN`` subclasses torchvision's ``FasterRCNN`` and adds methods only: its
state-dict keys are torchvision's (the ``fasterrcnn_resnet50_fpn`` ``COCO_V1`` file loads with
strict=True) and its ``forward`` is torchvision's (training: the loss dict; eval: detections).

A distiller needs what torchvision's training ``forward`` computes but does not return: the FPN
levels and the proposals the RoI head sampled, with their class logits and matched labels (DKD
on detection runs the teacher's box head on the student's sampled proposals; ReviewKD reads
p2–p6). ``train_step`` recomputes that forward from torchvision's public pieces (``transform``,
``backbone``, ``rpn``, ``roi_heads.select_training_samples``, ``box_roi_pool``, ``box_head``,
``box_predictor``, ``fastrcnn_loss``) in the same order, so it draws the same random numbers (the
resize choice, both samplers) and its losses equal ``forward``'s for the same RNG state.

Backbones follow torchvision's rule (``_backbone_setup``): with ``pretrained_backbone=True`` (the
published students start from an ImageNet file, ``load_backbone_weights``; loaded teachers)
FrozenBatchNorm2d and the first layers frozen; without (trained from scratch, e.g. the smoke
preset) plain BatchNorm and every layer trainable. Built with ``weights=None``: nothing is
downloaded.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.ops.misc import FrozenBatchNorm2d

from tskd.models.registry import register_model

# The FPN levels every model here returns, in order, with their strides relative to the padded
# batch: p2..p5 from the four backbone stages ("0".."3") and p6 ("pool", torchvision's
# LastLevelMaxPool: a stride-2 subsample of p5). All have ``FPN_CHANNELS`` channels.
FPN_LEVELS: dict[str, int] = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
FPN_CHANNELS = 256

# torchvision's MobileNetV2 ``features`` split into stages at its strided blocks: stage indices
# 0..5 are features[0] (stride 2), [2] (4), [4] (8), [7] (16), [14] (32, 160 ch) and [18] (the
# final 1x1 conv, 32, 1280 ch). Stages 1, 2, 3, 5 give one level per stride 4..32, so the FPN has
# p2–p6 like the ResNet teachers' (ReviewKD pairs R50 and MobileNetV2 level by level). Stage 5
# rather than 4 for stride 32: it is the deepest stride-32 feature, and keeping it keeps all of
# ``features`` in the body, so an ImageNet ``mobilenet_v2`` file loads with only ``classifier.*``
# left out (torchvision's default [4, 5] gives two stride-32 levels and no stride 4 or 8).
MOBILENET_V2_RETURNED_LAYERS = [1, 2, 3, 5]


@dataclass
class DetectionStep:
    """What one training step of the detector computed (``DistillableFasterRCNN.train_step``).

    * ``losses``: torchvision's four losses, ``loss_objectness``, ``loss_rpn_box_reg`` (RPN),
      ``loss_classifier``, ``loss_box_reg`` (RoI head), equal to training ``forward``'s;
    * ``features``: the FPN levels p2..p6 (``FPN_LEVELS`` order), each ``[B, 256, H/s, W/s]``
      of the padded batch (rounded up);
    * ``image_sizes``: each image's ``(height, width)`` after the resize, before padding;
    * ``padded``: the transformed batch ``[B, 3, H, W]`` (normalised, resized, padded to a
      multiple of 32): what a teacher's ``features_of`` takes;
    * ``proposals``: per image, the ``[n_i, 4]`` proposals the RoI head sampled (x1, y1, x2, y2
      in ``padded`` coordinates, ground-truth boxes included, as torchvision samples them);
    * ``roi_logits``: ``[sum n_i, num_classes]`` class logits of those proposals, images in order;
    * ``roi_labels``: ``[sum n_i]`` int64 labels they were matched to (0: background), row for row.
    """

    losses: dict[str, Tensor]
    features: list[Tensor]
    image_sizes: list[tuple[int, int]]
    padded: Tensor
    proposals: list[Tensor]
    roi_logits: Tensor
    roi_labels: Tensor


class DistillableFasterRCNN(FasterRCNN):
    """torchvision's ``FasterRCNN`` (forward unchanged) plus ``train_step``, ``features_of`` and
    ``roi_logits_on``. ``backbone_name`` is the torchvision classifier the backbone body comes from
    (``resnet18``, ..., ``mobilenet_v2``): which ImageNet file ``load_backbone_weights`` takes."""

    def __init__(self, backbone, num_classes: int, *, backbone_name: str, **kwargs):
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        self.backbone_name = backbone_name  # a plain attribute: not in the state dict

    @property
    def fpn_levels(self) -> dict[str, int]:
        """FPN level name -> stride (relative to the padded batch), in p2..p6 order."""
        return dict(FPN_LEVELS)

    @property
    def fpn_channels(self) -> int:
        return self.backbone.out_channels

    def features_of(self, padded: Tensor) -> list[Tensor]:
        """The FPN levels p2..p6 of an already transformed batch (``DetectionStep.padded``): a
        teacher's features on the student's images. Both normalise with torchvision's ImageNet
        mean/std, so the student's transformed batch is also the teacher's input."""
        return self._levels(self.backbone(padded))

    def roi_logits_on(self, features: list[Tensor], proposals: list[Tensor],
                      image_sizes: list[tuple[int, int]]) -> Tensor:
        """Class logits ``[sum n_i, num_classes]`` of this model's box head on given proposals and
        FPN levels (box_roi_pool -> box_head -> box_predictor): a teacher's logits on the
        proposals the student sampled."""
        return self._box_outputs(features, proposals, image_sizes)[0]

    def train_step(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> DetectionStep:
        """torchvision's training forward, keeping what a distiller reads (see ``DetectionStep``).

        ``images``: ``[3, H_i, W_i]`` float tensors in 0..1; ``targets``: per image ``boxes``
        (float ``[m, 4]``, x1 y1 x2 y2 in pixels) and ``labels`` (int64 ``[m]``), as for ``forward``.
        """
        if not self.training:
            # In eval mode the RPN keeps its test-time proposal counts and computes no loss.
            raise RuntimeError("train_step needs the model in training mode (model.train())")
        _check_targets(targets)
        batch, targets = self.transform(images, targets)
        _check_boxes(targets)  # after the resize, as torchvision's forward checks them
        levels = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, levels, targets)
        proposals, _, labels, regression_targets = self.roi_heads.select_training_samples(proposals, targets)
        features = self._levels(levels)
        logits, box_regression = self._box_outputs(features, proposals, batch.image_sizes)
        loss_classifier, loss_box_reg = fastrcnn_loss(logits, box_regression, labels, regression_targets)
        losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        return DetectionStep(losses=losses, features=features, image_sizes=list(batch.image_sizes),
                             padded=batch.tensors, proposals=proposals, roi_logits=logits,
                             roi_labels=torch.cat(labels))

    def _levels(self, levels: OrderedDict[str, Tensor]) -> list[Tensor]:
        if list(levels) != list(FPN_LEVELS):
            raise RuntimeError(f"the backbone returned FPN levels {list(levels)}, expected {list(FPN_LEVELS)}")
        return list(levels.values())

    def _box_outputs(self, features: list[Tensor], proposals: list[Tensor],
                     image_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        if len(features) != len(FPN_LEVELS):
            raise ValueError(f"expected {len(FPN_LEVELS)} FPN levels (p2..p6), got {len(features)}")
        # MultiScaleRoIAlign picks its levels by name from a dict, as torchvision's RoI head passes them.
        named = OrderedDict(zip(FPN_LEVELS, features, strict=True))
        pooled = self.roi_heads.box_roi_pool(named, proposals, image_sizes)
        return self.roi_heads.box_predictor(self.roi_heads.box_head(pooled))


def _check_targets(targets: list[dict[str, Tensor]]) -> None:
    """The input checks of torchvision's training forward and RoI head, which ``train_step`` bypasses."""
    for t in targets:
        boxes, labels = t.get("boxes"), t.get("labels")
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target boxes must be a [N, 4] tensor, got {getattr(boxes, 'shape', type(boxes))}")
        if not boxes.is_floating_point():
            raise TypeError(f"target boxes must be of a float type, got {boxes.dtype}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
            raise TypeError(f"target labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels))}")


def _check_boxes(targets: list[dict[str, Tensor]]) -> None:
    for i, t in enumerate(targets):
        bad = (t["boxes"][:, 2:] <= t["boxes"][:, :2]).any(dim=1)
        if bad.any():
            box = t["boxes"][bad][0].tolist()
            raise ValueError(f"all boxes must have a positive height and width; target {i} has {box}")


def _backbone_setup(pretrained_backbone: bool, trainable_layers: int | None, all_layers: int) -> dict:
    """torchvision's rule: a backbone that starts from trained weights gets FrozenBatchNorm2d and its
    first layers frozen (``trainable_layers``, default 3); one trained from scratch gets plain
    BatchNorm and every layer trainable (frozen random layers would never learn)."""
    default = 3 if pretrained_backbone else all_layers
    return {"norm_layer": FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d,
            "trainable_layers": default if trainable_layers is None else trainable_layers}


def _resnet_fpn(backbone_name: str, num_classes: int = 91, *, min_size: int | tuple[int, ...] = 800,
                max_size: int = 1333, pretrained_backbone: bool = False, trainable_layers: int | None = None,
                **kwargs) -> DistillableFasterRCNN:
    backbone = resnet_fpn_backbone(backbone_name=backbone_name, weights=None,
                                   **_backbone_setup(pretrained_backbone, trainable_layers, 5))
    return DistillableFasterRCNN(backbone, num_classes, backbone_name=backbone_name,
                                 min_size=min_size, max_size=max_size, **kwargs)


def _mobilenet_v2_fpn(num_classes: int = 91, *, min_size: int | tuple[int, ...] = 800, max_size: int = 1333,
                      pretrained_backbone: bool = False, trainable_layers: int | None = None,
                      **kwargs) -> DistillableFasterRCNN:
    # Pretrained: 3 of the 6 MobileNet stages trainable, torchvision's default for its MobileNet FPN detectors.
    backbone = mobilenet_backbone(backbone_name="mobilenet_v2", weights=None, fpn=True,
                                  returned_layers=MOBILENET_V2_RETURNED_LAYERS,
                                  **_backbone_setup(pretrained_backbone, trainable_layers, 6))
    return DistillableFasterRCNN(backbone, num_classes, backbone_name="mobilenet_v2",
                                 min_size=min_size, max_size=max_size, **kwargs)


def _factory(name: str, build):
    def factory(num_classes: int = 91, **kwargs) -> DistillableFasterRCNN:
        return build(num_classes, **kwargs)

    factory.__name__ = name
    factory.__doc__ = (f"Faster R-CNN + FPN ({name}), torchvision's, ``num_classes`` outputs (91: COCO's ids); "
                       "``min_size``/``max_size`` and other keywords go to ``FasterRCNN``.")
    return factory


# The torchvision classifier whose ImageNet file each detector's backbone starts from.
BACKBONE_OF = {"fasterrcnn_resnet18_fpn": "resnet18", "fasterrcnn_resnet50_fpn": "resnet50",
               "fasterrcnn_resnet101_fpn": "resnet101", "fasterrcnn_mobilenet_v2_fpn": "mobilenet_v2"}

for _arch in ("resnet18", "resnet50", "resnet101"):
    _name = f"fasterrcnn_{_arch}_fpn"
    register_model(_name, family="detection")(_factory(_name, partial(_resnet_fpn, _arch)))
register_model("fasterrcnn_mobilenet_v2_fpn", family="detection")(
    _factory("fasterrcnn_mobilenet_v2_fpn", _mobilenet_v2_fpn))
