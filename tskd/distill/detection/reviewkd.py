"""ReviewKD on the FPN: attention-based fusion (ABF) of the student's levels from the deepest up,
each compared with the teacher's level by the hierarchical context loss (mdistiller's detection
ReviewKD: the five levels p2-p6, 256 channels in and out, 256 in the middle)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tskd.distill.detection.base import DetectionDistiller, DetectionParams
from tskd.distill.losses import warmup_factor
from tskd.distill.methods.reviewkd import ABF, hcl_loss
from tskd.distill.registry import register_method


class DetectionReviewKDParams(DetectionParams):
    review_weight: float = Field(1.0, ge=0, description="weight of the HCL loss (mdistiller detection: 1.2 "
                                 "R101->R18, 1.0 R101->R50, 2.0 R50->MobileNetV2; set per pair)")
    mid_channels: int = Field(256, gt=0, description="ABF width (mdistiller detection: 256)")
    warmup: int = Field(0, ge=0, description="epochs of linear warm-up of the HCL weight (mdistiller's "
                        "detection ReviewKD has none: 0)")


@register_method("reviewkd", task="detection")
class DetectionReviewKD(DetectionDistiller):
    Params = DetectionReviewKDParams

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        s_ch, t_ch = student.fpn_channels, teacher.fpn_channels
        levels = len(student.fpn_levels)
        # Deepest level first (the order the review runs in); the deepest has nothing to fuse with.
        self.abfs = nn.ModuleList(ABF(s_ch, params.mid_channels, t_ch, fuse=k > 0) for k in range(levels))

    def forward_train(self, images, targets, epoch, indices=None):
        step = self.student.train_step(images, targets)
        t_feats = self.teacher_features(step.padded)
        outs, residual = [], None
        for abf, x, t in zip(self.abfs, step.features[::-1], t_feats[::-1], strict=True):
            out, residual = abf(x, residual, t.shape[-2:])
            outs.append(out)
        p = self.params
        review = p.review_weight * warmup_factor(epoch, p.warmup) * hcl_loss(outs[::-1], t_feats)
        return step.roi_logits, {**self.detector_losses(step), "review": review}
