"""ReviewKD: knowledge review (Chen et al., CVPR 2021), as its CIFAR code and mdistiller run it.

The student's stage taps ``feats[1:]`` plus its pooled feature (a 1x1 map) are fused deep-to-shallow
by attention-based fusion (ABF) modules: each level's features, reduced to ``mid`` channels, are
mixed with the (upsampled) fused features of the level below through two sigmoid attention maps,
resized to the teacher's size and projected to the teacher's channel count. The hierarchical
context loss (HCL) compares every level with the teacher's pre-activation tap (``preact_feats[1:]``
plus pooled feature) at full size and after 4x4, 2x2 and 1x1 average pooling with halving weights.
Channel counts come from ``probe_taps``; spatial sizes are read from the tensors at run time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.losses import warmup_factor
from tskd.distill.registry import register_method
from tskd.errors import ParamsError
from tskd.models.taps import probe_taps


class ReviewKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss (ReviewKD/mdistiller: 1)")
    review_weight: float = Field(5.0, ge=0, description="weight of the HCL loss. 5 in mdistiller's CIFAR config and "
                                 "in ReviewKD's script for resnet8x4, wrn_16_2, wrn_40_1 and ShuffleV1 students; "
                                 "the script uses 8 for ShuffleV2, 0.6 for resnet56->resnet20, 1 for "
                                 "resnet110->resnet32 (mdistiller's code default is 1)")
    warmup: int = Field(20, ge=0, description="epochs of linear warm-up of the HCL weight, min(e/warmup, 1) "
                        "with e counted from 1 (mdistiller WARMUP_EPOCHS / ReviewKD --kd-warm-up: 20); 0 = none")
    max_mid_channels: int = Field(512, gt=0, description="ABF width = min(this, student pooled-feature width) "
                                  "(ReviewKD/mdistiller: 512)")


class ABF(nn.Module):
    """Attention-based fusion of one student level with the fused residual from the level below."""

    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, fuse: bool):
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.BatchNorm2d(mid_ch))
        self.project = nn.Sequential(nn.Conv2d(mid_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_ch, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Return (output at ``out_size`` with the teacher's channels, fused residual for the next level)."""
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            w = self.attention(torch.cat([x, residual], dim=1))
            x = x * w[:, :1] + residual * w[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


def hcl_loss(student_feats: list[Tensor], teacher_feats: list[Tensor], levels=(4, 2, 1)) -> Tensor:
    """Hierarchical context loss: per level, MSE at full size plus MSE after adaptive average pooling
    to each l x l in ``levels`` smaller than the map, weighted 1/2, 1/4, ...; normalised by the weight
    sum; summed over levels."""
    total = 0.0
    for fs, ft in zip(student_feats, teacher_feats, strict=True):
        loss, weight, weights = F.mse_loss(fs, ft), 1.0, 1.0
        for lv in levels:
            if lv >= fs.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, lv), F.adaptive_avg_pool2d(ft, lv))
            weights += weight
        total = total + loss / weights
    return total


def _levels(taps: dict) -> list[Tensor]:
    """Stage taps after the stem, then the pooled feature as a 1x1 map: shallow to deep."""
    return [*taps["feats"][1:], taps["pooled_feat"][:, :, None, None]]


@register_method("reviewkd")
class ReviewKD(Distiller):
    Params = ReviewKDParams

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        s, t = probe_taps(student, ctx.image_size), probe_taps(teacher, ctx.image_size)
        in_ch = [c for c, _, _ in s.feats[1:]] + [s.pooled]
        out_ch = [c for c, _, _ in t.preact_feats[1:]] + [t.pooled]
        if len(in_ch) != len(out_ch):
            raise ParamsError(f"method 'reviewkd': student {type(student).__name__} gives {len(in_ch)} review levels "
                             f"and teacher {type(teacher).__name__} {len(out_ch)}; they must be paired one to one")
        mid = min(params.max_mid_channels, in_ch[-1])
        # Deepest level first: the order the review runs in; the deepest has nothing to fuse with.
        self.abfs = nn.ModuleList(ABF(i, mid, o, fuse=k > 0)
                                  for k, (i, o) in enumerate(zip(in_ch[::-1], out_ch[::-1], strict=True)))

    def forward_train(self, images, labels, epoch, indices=None):
        logits, taps = self.student(images)
        _, t_taps = self.teacher_forward(images)
        t_levels = [*t_taps["preact_feats"][1:], t_taps["pooled_feat"][:, :, None, None]]
        outs, residual = [], None
        for abf, x, t in zip(self.abfs, _levels(taps)[::-1], t_levels[::-1], strict=True):
            out, residual = abf(x, residual, t.shape[-2:])
            outs.append(out)
        p = self.params
        return logits, {
            "ce": p.ce_weight * F.cross_entropy(logits, labels),
            "review": p.review_weight * warmup_factor(epoch, p.warmup) * hcl_loss(outs[::-1], t_levels),
        }
