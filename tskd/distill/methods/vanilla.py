"""The student trained alone with cross-entropy: the baseline every table starts from."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.registry import register_method


class VanillaParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss")


@register_method("vanilla")
class Vanilla(Distiller):
    Params = VanillaParams
    needs_teacher = False

    def forward_train(self, images, labels, epoch, indices=None):
        logits, _ = self.student(images)
        return logits, {"ce": self.params.ce_weight * F.cross_entropy(logits, labels)}
