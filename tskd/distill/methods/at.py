"""Attention Transfer (Zagoruyko & Komodakis, ICLR 2017), as mdistiller/RepDistiller run it on CIFAR.

Every stage tap after the stem (``feats[1:]``, post-activation; or the taps ``student_taps`` and
``teacher_taps`` name) gives a spatial attention map
``A(x) = normalize(flatten(mean_c(x^p)))``; the loss is the mean squared difference of the
student's and teacher's maps, summed over stages. Maps of different sizes are compared after
adaptive-average-pooling the larger feature map to the smaller one's size. No KD term.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.registry import register_method
from tskd.errors import ParamsError
from tskd.models.taps import probe_taps


class ATParams(MethodParams):
    p: float = Field(2.0, gt=0, description="power applied to activations before the channel mean "
                     "(mdistiller AT.P / RepDistiller p: 2)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss (mdistiller: 1)")
    feat_weight: float = Field(1000.0, ge=0, description="weight of the summed attention loss "
                               "(mdistiller AT.LOSS.FEAT_WEIGHT / RepDistiller beta: 1000)")
    student_taps: tuple[int, ...] | None = Field(
        None, description="the student taps compared, paired in order with teacher_taps; null: every stage "
        "after the stem (feats[1:]), stage with stage. mdistiller's R50 -> MobileNetV1 pairs MobileNetV1's "
        "stages 2-4 with ResNet50's layers 1-3 (its MobileNetV1 has no stem tap): student_taps [2, 3, 4], "
        "teacher_taps [1, 2, 3]")
    teacher_taps: tuple[int, ...] | None = Field(None, description="the teacher taps; null: feats[1:]")

    @model_validator(mode="after")
    def _same_count(self):
        if (self.student_taps is None) != (self.teacher_taps is None) or (
                self.student_taps is not None and len(self.student_taps) != len(self.teacher_taps)):
            raise ValueError("student_taps and teacher_taps: both null, or lists of the same length")
        return self


def attention_map(feat: Tensor, p: float) -> Tensor:
    """(B, C, H, W) -> (B, H*W): channel mean of ``feat**p``, flattened, unit L2 norm per sample."""
    return F.normalize(feat.pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float) -> Tensor:
    """Mean squared difference of the two attention maps, the larger map pooled to the smaller."""
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if f_s.shape[-2:] != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if f_t.shape[-2:] != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@register_method("at")
class AT(Distiller):
    Params = ATParams

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        n_s = len(probe_taps(student, ctx.image_size).feats)
        n_t = len(probe_taps(teacher, ctx.image_size).feats)
        if params.student_taps is None:
            if n_s != n_t:
                raise ParamsError(f"method 'at': student {type(student).__name__} has {n_s} feature taps and "
                                  f"teacher {type(teacher).__name__} has {n_t}; AT pairs taps stage by stage "
                                  "(or set methods.at.student_taps and teacher_taps)")
            self.pairs = [(i, i) for i in range(1, n_s)]
        else:
            self.pairs = list(zip(params.student_taps, params.teacher_taps, strict=True))
            if max(params.student_taps) >= n_s or max(params.teacher_taps) >= n_t:
                raise ParamsError(f"method 'at': taps {self.pairs} out of range: the student has {n_s} feature "
                                  f"taps, the teacher {n_t}")

    def forward_train(self, images, labels, epoch, indices=None):
        logits, taps = self.student(images)
        _, t_taps = self.teacher_forward(images)
        p = self.params
        loss = sum(at_loss(taps["feats"][i], t_taps["feats"][j], p.p) for i, j in self.pairs)
        return logits, {
            "ce": p.ce_weight * F.cross_entropy(logits, labels),
            "at": p.feat_weight * loss,
        }
