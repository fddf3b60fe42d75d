"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022), mdistiller's CIFAR-100 recipe.

KD's KL splits into TCKD, the KL between the binary (target vs. all non-target) distributions,
and NCKD, the KL between the distributions over the non-target classes alone. DKD weights them
independently: ``alpha * TCKD + beta * NCKD``, both at temperature T and scaled by T^2, and ramps
that sum in linearly over the first ``warmup`` epochs (see ``losses.warmup_factor``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.losses import warmup_factor
from tskd.distill.registry import register_method


class DKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss (mdistiller DKD.CE_WEIGHT: 1)")
    alpha: float = Field(1.0, ge=0, description="TCKD weight (mdistiller DKD.ALPHA: 1)")
    beta: float = Field(8.0, ge=0, description="NCKD weight. mdistiller default 8 (resnet32x4 pairs, wrn_40_2->"
                        "ShuffleV1, ResNet50->MobileNetV2); its per-pair configs use 2 for resnet56->resnet20 and "
                        "resnet110->resnet32, 6 for wrn_40_2->wrn_16_2, wrn_40_2->wrn_40_1, vgg13->vgg8 and "
                        "vgg13->MobileNetV2")
    T: float = Field(4.0, gt=0, description="softmax temperature (mdistiller DKD.T: 4)")
    warmup: int = Field(20, ge=0, description="epochs of linear warm-up of the DKD weight, min(e/warmup, 1) "
                        "with e counted from 1 (mdistiller DKD.WARMUP: 20); 0 = none")


def dkd_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, T: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each ``KL(teacher || student) * T^2`` averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    c = student_logits.shape[1]
    target = F.one_hot(labels, c).bool()
    # Gathers, not boolean-mask indexing: a mask's output size depends on the data, so indexing
    # with it waits for the GPU every step. Column j of ``others`` is the j-th non-target class.
    cols = torch.arange(c - 1, device=labels.device)
    others = cols + (cols[None, :] >= labels[:, None])

    def binary(log_p: Tensor) -> Tensor:  # log [p_target, 1 - p_target], computed stably
        log_other = torch.logsumexp(log_p.masked_fill(target, float("-inf")), dim=1)
        return torch.stack([log_p.gather(1, labels[:, None]).squeeze(1), log_other], dim=1)

    def non_target(logits: Tensor) -> Tensor:  # log-softmax over the C-1 non-target classes only
        return F.log_softmax(logits.gather(1, others) / T, dim=1)

    def kl(log_q_s: Tensor, log_q_t: Tensor) -> Tensor:
        return F.kl_div(log_q_s, log_q_t, reduction="none", log_target=True).sum(dim=1).mean() * T**2

    tckd = kl(binary(log_p_s), binary(log_p_t))
    nckd = kl(non_target(student_logits), non_target(teacher_logits))
    return tckd, nckd


@register_method("dkd")
class DKD(Distiller):
    Params = DKDParams

    def forward_train(self, images, labels, epoch, indices=None):
        logits, _ = self.student(images)
        t_logits, _ = self.teacher_forward(images)
        p = self.params
        tckd, nckd = dkd_terms(logits, t_logits, labels, p.T)
        ramp = warmup_factor(epoch, p.warmup)
        return logits, {
            "ce": p.ce_weight * F.cross_entropy(logits, labels),
            "tckd": ramp * p.alpha * tckd,
            "nckd": ramp * p.beta * nckd,
        }
