"""TSKD on a detector (docs/method.md, "Detection"): KD on the RoI head's class logits every epoch;
at review nodes, one ConvLSTM per chosen FPN level reads how the student's attention maps of that
level changed over its last k memory snapshots and now, and its forecast is pulled towards the
current student-teacher gap |S - T| of that level.

Images of a batch differ in size and batches differ in padded size. Within one step every map
is computed on the same padded batch: the k snapshots of the student's backbone + FPN, the
student itself and the teacher all run on the student's transformed images, so the increments
between them are aligned pixel for pixel and the forecasters (fully convolutional) take
whatever size the batch has. Nothing is carried from one step to the next but the weights.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from tskd.distill.detection.base import DetectionDistiller, RoILogitsParams
from tskd.distill.losses import kd_loss
from tskd.distill.registry import register_method
from tskd.distill.tskd.attention import attention_map, increment_sequence
from tskd.distill.tskd.convlstm import IncrementForecaster, forecast
from tskd.distill.tskd.lifecycle import ReviewSchedule
from tskd.distill.tskd.memory import SnapshotMemory
from tskd.errors import ParamsError


class DetectionTSKDParams(RoILogitsParams):
    kd_weight: float = Field(1.0, ge=0, description="weight of KD on the RoI class logits (TSKD's KD part; "
                             "the teacher's head on the student's proposals)")
    T: float = Field(1.0, gt=0, description="KD softmax temperature (1, as the detection DKD)")
    review_weight: float = Field(1.0, ge=0, description="weight of the review (ConvLSTM) loss at review epochs")
    schedule_unit: Literal["epochs", "iterations"] = Field(
        "epochs", description="what delta and node_iters count: 'epochs' (the authors' CIFAR schedule: a node is "
        "a whole epoch) or 'iterations' (training steps, as detection recipes count: a node every delta steps, "
        "lasting node_iters steps)")
    delta: int = Field(2, ge=1, description="epochs (or steps) between nodes. The authors' 240-epoch schedule "
                       "(delta 5, k 3) has 12 reviews; a 26-epoch detection schedule gives 3 reviews with delta 2, k 3")
    node_iters: int | None = Field(None, ge=1, description="schedule_unit 'iterations': the steps a node lasts (a "
                                   "memory node snapshots after its last one, a review node adds the review loss to "
                                   "each); null = delta, the whole interval. Not used with 'epochs'")
    k: int = Field(3, ge=1, description="memory nodes (snapshots) per cycle; the next node reviews them")
    levels: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="FPN levels used as branches "
                                    "(0 = p2, the finest, ... 4 = p6); the authors' first three taps are the "
                                    "finest maps of their networks, so p2-p4")
    hidden_channels: tuple[int, ...] | None = Field(
        None, description="ConvLSTM hidden width per branch; null = 64 for the finest chosen level, 32 for the "
        "others (the authors' rule on CIFAR)")
    at_norm: Literal["column", "flat"] = Field("column", description="attention-map normalisation (authors: "
                                                "'column')")
    detach_target: bool = Field(False, description="detach the target |S - T| (the authors do not)")
    detach_increment: bool = Field(False, description="detach the last increment |S - Mk| (the authors do not)")
    recompute_forecasters: bool = Field(
        True, description="keep none of the ConvLSTM forecasters' activations for the backward and compute them "
        "again there (torch.utils.checkpoint): the same numbers (bit for bit on CPU), TSKD's peak memory at "
        "review ÷ KD's from 1.42 to 1.22 (on CIFAR's resnet32x4 -> resnet8x4), for one more forecaster "
        "forward per review step. false: keep them, as the authors' code does")
    forecaster_between_reviews: Literal["decay", "frozen"] = Field(
        "decay", description="the forecasters between reviews: 'decay' (authors: zero gradients, weight decay "
        "and momentum go on) or 'frozen'")

    @model_validator(mode="after")
    def _check(self):
        if min(self.levels) < 0 or len(set(self.levels)) != len(self.levels):
            raise ValueError(f"levels must be distinct FPN level indices >= 0, got {list(self.levels)}")
        if self.node_iters is not None and (self.schedule_unit != "iterations" or self.node_iters > self.delta):
            raise ValueError(f"node_iters {self.node_iters} needs schedule_unit 'iterations' and at most delta "
                             f"({self.delta}) steps")
        if self.hidden_channels is not None and len(self.hidden_channels) != len(self.levels):
            raise ValueError(f"hidden_channels needs one width per level ({len(self.levels)}), got "
                             f"{list(self.hidden_channels)}")
        return self


@register_method("tskd", task="detection")
class DetectionTSKD(ReviewSchedule, DetectionDistiller):
    Params = DetectionTSKDParams

    def __init__(self, student, teacher, params: DetectionTSKDParams, ctx):
        super().__init__(student, teacher, params, ctx)
        self.check_schedule(params, epochs=ctx.epochs, steps_per_epoch=ctx.steps_per_epoch)
        if params.schedule_unit == "iterations" and not ctx.steps_per_epoch:
            raise ParamsError("method 'tskd' (detection): schedule_unit 'iterations' needs the run's steps per epoch")
        n = len(student.fpn_levels)
        if max(params.levels) >= n:
            raise ParamsError(f"method 'tskd' (detection): levels {list(params.levels)} but "
                              f"{type(student).__name__}'s FPN has {n} levels (0-{n - 1})")
        finest = min(params.levels)
        hidden = params.hidden_channels or tuple(64 if lv == finest else 32 for lv in params.levels)
        self.forecasters = nn.ModuleList(IncrementForecaster(h) for h in hidden)
        self.memory = SnapshotMemory(params.k)
        # The snapshots run through a weight-less copy of the backbone + FPN (weights come per call).
        # Its BatchNorm layers (a backbone trained from scratch has them; a pretrained one has frozen
        # ones) use the batch's statistics, as the authors' snapshot forwards do, and update nothing:
        # a snapshot is never written to. Kept out of the module tree (no state, no device).
        runner = copy.deepcopy(student.backbone).to("meta")
        for m in runner.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
        self._runner = [runner.train()]

    def snapshot_source(self) -> nn.Module:
        # The backbone + FPN only: the maps come from there, and the heads would only cost memory.
        return self.student.backbone

    def forward_train(self, images, targets, epoch, indices=None):
        p = self.params
        step = self.student.train_step(images, targets)
        t_feats = self.teacher_features(step.padded)
        t_logits = self.teacher_roi_logits(t_feats, step)
        s_logits, t_logits, _ = self.distilled(step, t_logits)
        losses = {**self.detector_losses(step), "kd": p.kd_weight * kd_loss(s_logits, t_logits, p.T)}
        if self.reviewing(epoch):
            losses["review"] = p.review_weight * self.review_loss(step.padded, step.features, t_feats)
        return step.roi_logits, losses

    def review_loss(self, padded: Tensor, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
        """``sum_l MSE(P_l, |S_l - T_l|)`` over the chosen FPN levels, P_l forecast from the increments."""
        p = self.params
        runner = self._runner[0]
        with torch.no_grad():  # the snapshots' maps only; their feature maps need not stay alive
            memory = []
            for snapshot in self.memory.snapshots():
                levels = list(functional_call(runner, snapshot, (padded,)).values())
                memory.append([attention_map(levels[lv], p.at_norm) for lv in p.levels])
        loss = padded.new_zeros(())
        for branch, (lv, forecaster) in enumerate(zip(p.levels, self.forecasters, strict=True)):
            s, t = attention_map(s_feats[lv], p.at_norm), attention_map(t_feats[lv], p.at_norm)
            frames = increment_sequence([maps[branch] for maps in memory], s.detach() if p.detach_increment else s)
            target = (s - t).abs()
            pred = forecast(forecaster, frames, p.recompute_forecasters)
            loss = loss + F.mse_loss(pred, target.detach() if p.detach_target else target)
        return loss
