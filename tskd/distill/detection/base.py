"""What every detection method shares: the detector's own losses, the teacher's views of the
student's batch, and an eval forward that returns the student's detections."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from tskd.distill.base import Distiller, MethodParams


class DetectionParams(MethodParams):
    det_weight: float = Field(1.0, ge=0, description="weight of the detector's own losses (RPN objectness and "
                              "box regression, RoI classification and box regression; torchvision's sum)")


def _short(name: str) -> str:
    # torchvision's "loss_objectness" etc.: the history's columns read "train_objectness".
    return name.removeprefix("loss_")


class DetectionDistiller(Distiller):
    """Base of the detection methods: ``forward`` is the student's detections (evaluation)."""

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
