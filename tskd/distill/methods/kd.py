"""Hinton et al. (2015) knowledge distillation on the logits."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.losses import kd_loss
from tskd.distill.registry import register_method


class KDParams(MethodParams):
    T: float = Field(4.0, gt=0, description="softmax temperature (CIFAR convention: 4)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss")
    kd_weight: float = Field(1.0, ge=0, description="weight of the KD loss (mdistiller CIFAR: 0.9/0.1 "
                             "variants exist; the TSKD authors use 1/1)")


@register_method("kd")
class KD(Distiller):
    Params = KDParams

    def forward_train(self, images, labels, epoch, indices=None):
        logits, _ = self.student(images)
        t_logits, _ = self.teacher_forward(images)
        p = self.params
        return logits, {
            "ce": p.ce_weight * F.cross_entropy(logits, labels),
            "kd": p.kd_weight * kd_loss(logits, t_logits, p.T),
        }
