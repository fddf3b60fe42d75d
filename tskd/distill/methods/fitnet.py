"""FitNets: hints for thin deep nets (Romero et al., ICLR 2015), as mdistiller/RepDistiller run it.

A convolutional regressor maps the student's hint tap (``feats[hint_layer]``) onto the teacher's
same tap; the hint loss is the MSE between the two. mdistiller and RepDistiller train the hint
jointly with cross-entropy from the first epoch. The paper's first stage (student up to the
hint layer plus regressor trained on the hint loss alone) is available as ``hint_epochs``:
during those epochs ``forward_train`` returns only the hint loss, so the layers after the hint
tap and the classifier get no gradient (and, having none, no SGD update or weight decay).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.registry import register_method
from tskd.errors import ParamsError
from tskd.models.taps import probe_taps


class FitNetParams(MethodParams):
    hint_layer: int = Field(2, ge=0, description="index into the feature taps (0 = stem, then one per stage) "
                            "of the hint/guided layer (mdistiller FITNET.HINT_LAYER / RepDistiller: 2)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss (mdistiller: 1)")
    feat_weight: float = Field(100.0, ge=0, description="weight of the hint MSE (mdistiller FEAT_WEIGHT / "
                               "RepDistiller beta: 100)")
    hint_epochs: int = Field(0, ge=0, description="epochs of hint-only training before the joint stage "
                             "(FitNets paper stage 1); 0 disables it, which is what mdistiller and "
                             "RepDistiller (and so the published CIFAR numbers) do")


class ConvRegressor(nn.Module):
    """Student tap (C_s, H_s, W_s) -> teacher tap (C_t, H_t, W_t): conv + BN + ReLU (mdistiller ConvReg).

    Halving uses a 3x3 stride-2 conv, doubling a 4x4 stride-2 transposed conv, any other shrink a
    valid conv of kernel (1 + H_s - H_t, 1 + W_s - W_t) (1x1 when the sizes agree)."""

    def __init__(self, s_shape: tuple[int, int, int], t_shape: tuple[int, int, int], where: str):
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = s_shape, t_shape
        if (hs, ws) == (2 * ht, 2 * wt):
            self.conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ParamsError(f"method 'fitnet' ({where}): cannot regress a student tap of {hs}x{ws} onto a "
                             f"teacher tap of {ht}x{wt} (only equal, halved, doubled or smaller teacher maps)")
        self.bn = nn.BatchNorm2d(ct)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


@register_method("fitnet")
class FitNet(Distiller):
    Params = FitNetParams

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        s, t = probe_taps(student, ctx.image_size), probe_taps(teacher, ctx.image_size)
        where = f"{type(teacher).__name__} -> {type(student).__name__}"
        k = params.hint_layer
        if k >= min(len(s.feats), len(t.feats)):
            raise ParamsError(f"method 'fitnet' ({where}): hint_layer={k} is out of range; the student has "
                             f"{len(s.feats)} feature taps and the teacher {len(t.feats)}")
        self.regressor = ConvRegressor(s.feats[k], t.feats[k], where)

    @classmethod
    def check_schedule(cls, params, *, epochs):
        if params.hint_epochs >= epochs:
            raise ParamsError(f"fitnet.hint_epochs={params.hint_epochs} must be smaller than the run's "
                             f"{epochs} epochs (0 disables the hint stage)")

    def in_hint_stage(self, epoch: int) -> bool:
        return epoch < self.params.hint_epochs

    def forward_train(self, images, labels, epoch, indices=None):
        logits, taps = self.student(images)
        _, t_taps = self.teacher_forward(images)
        p = self.params
        hint = p.feat_weight * F.mse_loss(self.regressor(taps["feats"][p.hint_layer]), t_taps["feats"][p.hint_layer])
        if self.in_hint_stage(epoch):
            return logits, {"hint": hint}
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "hint": hint}
