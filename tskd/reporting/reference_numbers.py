"""Published figures to show beside ours (classification: top-1 %; COCO: box AP %), each with the
figure it is and its source.

Only comparable with the same figure on the same data: the report shows them for the official
datasets only (not synthetic or registered data), and says which figure each one is.
"""

from __future__ import annotations

from typing import NamedTuple


class Published(NamedTuple):
    value: float  # in the task's main figure: top-1 (classification), box AP (detection)
    figure: str  # "best" (best epoch) or "last" (final epoch)
    source: str


_REPDISTILLER = "RepDistiller (CRD) table"
_MDISTILLER = "mdistiller (DKD paper)"
_CIFAR_PAIRS = ("resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2",
                "wrn_40_2-wrn_40_1", "vgg13-vgg8")
# Rows of RepDistiller's CIFAR-100 table (last epoch), in the order of _CIFAR_PAIRS; DKD's from mdistiller.
_CIFAR_ROWS = {
    "teacher": (72.34, 74.31, 79.42, 75.61, 75.61, 74.64),
    "vanilla": (69.06, 71.14, 72.50, 73.26, 71.98, 70.36),
    "kd": (70.66, 73.08, 73.33, 74.92, 73.54, 72.98),
    "fitnet": (69.21, 71.06, 73.50, 73.58, 72.24, 71.02),
    "at": (70.55, 72.31, 73.44, 74.08, 72.77, 71.43),
    "crd": (71.16, 73.48, 75.51, 75.48, 74.14, 73.94),
}
_CIFAR_DKD = (71.97, 74.11, 76.32, 76.23, 74.81, 74.68)

_IMAGENET_SOURCE = "mdistiller ImageNet table (best epoch)"
PUBLISHED: dict[tuple[str, str, str], Published] = {
    **{("cifar100", pair, method): Published(v, "last", _REPDISTILLER)
       for method, values in _CIFAR_ROWS.items() for pair, v in zip(_CIFAR_PAIRS, values, strict=True)},
    **{("cifar100", pair, "dkd"): Published(v, "best", _MDISTILLER) for pair, v in zip(_CIFAR_PAIRS, _CIFAR_DKD,
                                                                                          strict=True)},
    ("imagenet", "resnet34-resnet18", "teacher"): Published(73.31, "best", "torchvision IMAGENET1K_V1"),
    ("imagenet", "resnet50-MobileNetV1", "teacher"): Published(76.13, "best", "torchvision IMAGENET1K_V1"),
    **{("imagenet", "resnet34-resnet18", m): Published(v, "best", _IMAGENET_SOURCE) for m, v in (
        ("vanilla", 69.75), ("kd", 71.03), ("at", 70.70), ("crd", 71.17), ("reviewkd", 71.61), ("dkd", 71.70))},
    ("imagenet", "resnet34-resnet18", "tskd"): Published(71.78, "best", "TSKD paper: student + 2.03"),
    **{("imagenet", "resnet50-MobileNetV1", m): Published(v, "best", _IMAGENET_SOURCE) for m, v in (
        ("vanilla", 68.87), ("kd", 70.50), ("reviewkd", 72.56), ("dkd", 72.05))},
    # COCO box AP. torchvision's fasterrcnn_resnet50_fpn COCO_V1 (the R50 teacher when imported); TSKD's
    # R50-FPN student (the paper's summary; no public code or config: the teacher is assumed R101, as in
    # the R101->R50 pair every detection-KD paper uses). No distillation baseline's AP is quoted: none
    # of the code bases read here publishes them.
    ("coco", "fasterrcnn_resnet50_fpn-fasterrcnn_mobilenet_v2_fpn", "teacher"):
        Published(37.0, "last", "torchvision COCO_V1"),
    ("coco", "fasterrcnn_resnet101_fpn-fasterrcnn_resnet50_fpn", "tskd"): Published(37.1, "best",
                                                                                   "TSKD paper (summary)"),
}


def published(dataset: str, pair: str, method: str) -> Published | None:
    """The published figure for ``method`` on ``pair`` of the official ``dataset``, if there is one."""
    return PUBLISHED.get((dataset, pair, method))
