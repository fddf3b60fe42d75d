"""A detector trained alone: its own losses, as torchvision trains it."""

from __future__ import annotations

from tskd.distill.detection.base import DetectionDistiller, DetectionParams
from tskd.distill.registry import register_method


@register_method("vanilla", task="detection")
class DetectionVanilla(DetectionDistiller):
    Params = DetectionParams
    needs_teacher = False

    def forward_train(self, images, targets, epoch, indices=None):
        step = self.student.train_step(images, targets)
        return step.roi_logits, self.detector_losses(step)
