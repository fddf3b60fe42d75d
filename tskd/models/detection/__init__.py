"""COCO detection models: torchvision's Faster R-CNN + FPN (ResNet-18/50/101, MobileNetV2 backbones).

Importing this package registers them (family ``detection``, 91 classes by default: COCO's
category ids 1..90 plus background, the layout of torchvision's COCO weights).
"""

from tskd.models.detection.faster_rcnn import (
    BACKBONE_OF,
    FPN_CHANNELS,
    FPN_LEVELS,
    MOBILENET_V2_RETURNED_LAYERS,
    DetectionStep,
    DistillableFasterRCNN,
)
from tskd.models.detection.weights import load_backbone_weights, torchvision_keys

__all__ = ["BACKBONE_OF", "FPN_CHANNELS", "FPN_LEVELS", "MOBILENET_V2_RETURNED_LAYERS", "DetectionStep",
           "DistillableFasterRCNN", "load_backbone_weights", "torchvision_keys"]
