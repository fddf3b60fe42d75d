"""KD and DKD on the RoI head's class logits: the student's sampled proposals classified by both
heads (mdistiller's detection DKD; KD is the same construction with Hinton's loss)."""

from __future__ import annotations

from pydantic import Field

from tskd.distill.detection.base import DetectionDistiller, RoILogitsParams
from tskd.distill.losses import kd_loss, warmup_factor
from tskd.distill.methods.dkd import dkd_terms
from tskd.distill.registry import register_method


class DetectionKDParams(RoILogitsParams):
    kd_weight: float = Field(1.0, ge=0, description="weight of the KD loss on the RoI class logits (no published "
                             "detection KD config to follow; 1 as the det losses)")
    T: float = Field(1.0, gt=0, description="softmax temperature (1, as mdistiller's detection DKD)")


class DetectionDKDParams(RoILogitsParams):
    alpha: float = Field(1.0, ge=0, description="TCKD weight (mdistiller detection: 1)")
    beta: float = Field(0.25, ge=0, description="NCKD weight (mdistiller detection: 0.25)")
    T: float = Field(1.0, gt=0, description="softmax temperature (mdistiller detection: 1)")
    warmup: int = Field(0, ge=0, description="epochs of linear warm-up of the DKD weight (mdistiller's detection "
                        "DKD has none: 0)")


@register_method("kd", task="detection")
class DetectionKD(DetectionDistiller):
    Params = DetectionKDParams

    def forward_train(self, images, targets, epoch, indices=None):
        step = self.student.train_step(images, targets)
        t_logits = self.teacher_roi_logits(self.teacher_features(step.padded), step)
        p = self.params
        s_logits, t_logits, _ = self.distilled(step, t_logits)
        return step.roi_logits, {**self.detector_losses(step), "kd": p.kd_weight * kd_loss(s_logits, t_logits, p.T)}


@register_method("dkd", task="detection")
class DetectionDKD(DetectionDistiller):
    Params = DetectionDKDParams

    def forward_train(self, images, targets, epoch, indices=None):
        step = self.student.train_step(images, targets)
        t_logits = self.teacher_roi_logits(self.teacher_features(step.padded), step)
        p = self.params
        # The proposals' matched classes (0 = background) are the "target" of the decoupling.
        tckd, nckd = dkd_terms(*self.distilled(step, t_logits), p.T)
        ramp = warmup_factor(epoch, p.warmup)
        return step.roi_logits, {**self.detector_losses(step), "tckd": ramp * p.alpha * tckd,
                                 "nckd": ramp * p.beta * nckd}
