"""What every detection method shares: the detector's own losses, the teacher's views of the
student's batch, and an eval forward that returns the student's detections."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from tskd.distill.base import Distiller, MethodParams


class DetectionParams(MethodParams):
    det_weight: float = Field(1.0, ge=0, description="weight of the detector's own losses (RPN objectness and "
                              "box regression, RoI classification and box regression; torchvision's sum)")


class RoILogitsParams(DetectionParams):
    """The params of a method that distils the RoI head's class logits."""

    distill_classes: Literal["head", "dataset"] = Field(
        "head", description="the logit columns KD/DKD's softmax runs over: 'head' = every output of the box head "
        "(91 on COCO: its ids 1-90, 10 of them never used, and background); 'dataset' = background and the "
        "dataset's categories (COCO's 80, contiguous, as mdistiller/detectron2 distil), labels renumbered")


def _short(name: str) -> str:
    # torchvision's "loss_objectness" etc.: the history's columns read "train_objectness".
    return name.removeprefix("loss_")


class DetectionDistiller(Distiller):
    """Base of the detection methods: ``forward`` is the student's detections (evaluation)."""

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        # Only the methods that distil RoI logits have the param (RoILogitsParams).
        if getattr(params, "distill_classes", "head") == "dataset":
            if not ctx.classes:
                raise ValueError("distill_classes 'dataset' needs the dataset's classes (DistillContext.classes)")
            kept = [0] + [i for i, name in enumerate(ctx.classes) if i and name]
            # label -> its column among the kept ones (-1: a label the dataset does not use)
            column = torch.full((len(ctx.classes),), -1, dtype=torch.long)
            column[kept] = torch.arange(len(kept))
            self.register_buffer("_kept", torch.tensor(kept), persistent=False)
            self.register_buffer("_column", column, persistent=False)

    def distilled(self, step: Any, t_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The student's and the teacher's RoI logits and the proposals' labels, over the columns
        ``distill_classes`` keeps."""
        if self.params.distill_classes == "head":
            return step.roi_logits, t_logits, step.roi_labels
        return step.roi_logits[:, self._kept], t_logits[:, self._kept], self._column[step.roi_labels]

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.student(images)

    def detector_losses(self, step: Any) -> dict[str, Tensor]:
        w = self.params.det_weight
        return {_short(k): w * v for k, v in step.losses.items()}

    @torch.no_grad()
    def teacher_features(self, padded: Tensor) -> list[Tensor]:
        """The teacher's FPN levels of the student's padded, normalised batch: both detectors
        normalise with torchvision's ImageNet statistics, so the teacher sees what the student sees
        (and the two sets of levels have the same sizes)."""
        return self.teacher.features_of(padded)

    @torch.no_grad()
    def teacher_roi_logits(self, features: list[Tensor], step: Any) -> Tensor:
        """The teacher's class logits on the student's sampled proposals (mdistiller's detection KD)."""
        return self.teacher.roi_logits_on(features, step.proposals, step.image_sizes)
