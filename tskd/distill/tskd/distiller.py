"""TSKD: Temporal Supervised Knowledge Distillation (arXiv 2307.00811), see docs/method.md.

KD on the logits every epoch; at review nodes, a ConvLSTM per feature branch reads how the
student's attention maps changed over its last k memory snapshots and the current step, and
its forecast is pulled towards the current student-teacher gap ``|S - T|``. The params
``target``, ``sequence`` and ``forecaster`` swap each of these parts for an ablation
(docs/method.md, "Ablations"); their defaults are the authors'.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.losses import kd_loss
from tskd.distill.registry import register_method
from tskd.distill.tskd.attention import attention_map, increment_sequence, raw_sequence, review_target
from tskd.distill.tskd.compiled import check_compiles, maybe_compiled
from tskd.distill.tskd.convlstm import IncrementForecaster, auto_hidden, forecast, recomputed_branches
from tskd.distill.tskd.evolution import MapEvolution
from tskd.distill.tskd.lifecycle import ReviewSchedule
from tskd.distill.tskd.memory import SnapshotMemory
from tskd.distill.tskd.prefix import TapPrefix
from tskd.distill.tskd.recorder import FigureRecorder
from tskd.engine.events import Observer
from tskd.errors import ParamsError
from tskd.models.taps import authors_preact, probe_taps

BnMode = Literal["train", "eval"]


class TSKDParams(MethodParams):
    """Defaults reproduce the authors' CIFAR code (recipe ``tskd_v1``)."""

    T: float = Field(4.0, gt=0, description="KD softmax temperature")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss")
    kd_weight: float = Field(1.0, ge=0, description="weight of the Hinton KD loss")
    review_weight: float = Field(1.0, ge=0, description="weight of the review (ConvLSTM) loss at review epochs")
    delta: int = Field(5, ge=1, description="epochs between nodes: epochs 0, delta, 2*delta, ... are nodes")
    k: int = Field(3, ge=1, description="memory nodes (snapshots) per cycle; the next node reviews them")
    at_norm: Literal["column", "flat"] = Field(
        "column", description="attention-map normalisation: 'column' = L2 along H per column (authors' "
        "F.normalize default), 'flat' = L2 over all H*W positions (classic attention transfer)")
    detach_target: bool = Field(False, description="detach the target |S - T|; the authors do not, so "
                                "the student also gets gradient through it")
    detach_increment: bool = Field(False, description="detach the last input increment |S - Mk|; the "
                                   "authors do not")
    snapshot_bn: BnMode = Field("train", description="BatchNorm of the snapshot forwards: 'train' = batch "
                                "statistics (authors), 'eval' = the snapshot's running statistics")
    teacher_bn: BnMode = Field(
        "eval", description="BatchNorm of the frozen teacher while training. Default 'eval' (running "
        "statistics), deliberately not the authors' 'train' (a ReviewKD habit, not part of TSKD): our KD and "
        "other baselines, like mdistiller/RepDistiller's, use an eval teacher, so a TSKD-KD gap measures the "
        "review loss rather than a teacher change; in train mode the teacher's logits and the target |S - T| "
        "depend on the batch (its size differs between recipes); and batch-statistics BN makes the teacher "
        "forward ~10-20% slower on CPU, which alone exceeds TSKD's whole-run cost budget. Set 'train' to "
        "replicate the authors' run exactly (its running statistics drift but are never read: resume stays exact).")
    teacher_taps: Literal["authors", "preact", "post"] = Field(
        "authors", description="the teacher feature maps the branches compare with: 'preact' = each stage's "
        "output before its last activation, 'post' = after it (as the student's); 'authors' = what the authors' "
        "code gives: pre-activation, except for VGG teachers, whose definition there ignores its preact flag and "
        "returns post-activation maps")
    taps: tuple[int, ...] = Field((0, 1, 2), min_length=1, description="feature taps used as branches "
                                  "(0 = stem, then stages); the authors use the first three")
    hidden_channels: tuple[int, ...] | None = Field(
        None, description="ConvLSTM hidden width per branch; null = 64 at the largest tap resolution, "
        "32 elsewhere (gives the authors' 64,64,32 for ResNet/WRN and 64,32,32 for VGG-8)")
    forecaster_between_reviews: Literal["decay", "frozen"] = Field(
        "decay", description="what SGD does to the ConvLSTM forecasters in the epochs between reviews, once "
        "the first review has given them gradients. 'decay' (authors): their torch 1.9 zero_grad() fills "
        "gradients with zeros, so weight decay and Nesterov momentum go on shrinking the forecasters in every "
        "step (to about 2.4% between two reviews at lr 0.1); 'frozen': gradients are cleared (set to None, "
        "the torch >= 2.0 default) and the forecasters stay as the last review left them")
    recompute_forecasters: bool = Field(
        True, description="keep none of the activations of the ConvLSTM forecasters that would be held at the review "
        "step's memory peak, and compute them again in the backward (torch.utils.checkpoint): the same numbers (bit "
        "for bit on CPU), TSKD's peak memory at review about 1.25x KD's instead of 1.4x (resnet32x4 -> resnet8x4, "
        "batch 128, CPU). The tap sizes decide which: the branches from the first up to the one whose forecaster "
        "holds the most activations (hidden width x map area), i.e. the first alone with the presets' taps, largest "
        "map first (convlstm.recomputed_branches, docs/method.md \"Cost\"). false: keep them all, as the authors' "
        "code does")
    target: Literal["dynamic", "static", "signed"] = Field(
        "dynamic", description="what the forecast is pulled towards: 'dynamic' = |S - T| (authors), 'static' = the "
        "teacher's attention map T (no gradient reaches the student through it), 'signed' = S - T")
    sequence: Literal["increments", "raw"] = Field(
        "increments", description="the frames the forecaster reads: 'increments' = |M1 - M2|, ..., |S - Mk| "
        "(authors), 'raw' = the maps themselves, M2, ..., Mk, S: as many frames (k), M1 left out")
    forecaster: Literal["convlstm", "last_increment"] = Field(
        "convlstm", description="what forecasts the target: 'convlstm' = the ConvLSTM encoder-forecaster "
        "(authors), 'last_increment' = the last frame of the sequence as it is (|S - Mk| for the authors' "
        "sequence), a predictor without parameters")
    measure_predictability: bool = Field(
        True, description="at every review step, measure MSE(forecast, target) and MSE(last frame, target), "
        "summed over the branches as the review loss is: the history's train_forecast_mse, "
        "train_last_increment_mse and their ratio train_predictability (< 1: the forecast beats 'no change'). "
        "Changes no number of the run")
    evolution_images: int = Field(
        4, ge=0, le=64, description="how many fixed test images (spread evenly over the test split) to follow: "
        "at every memory node the snapshot's attention maps of them, at every branch's tap, go to the run's "
        "evolution.npz, and the report draws them as a grid (plots/evolution/). 0: none. Changes no number of "
        "the run")
    compile: bool = Field(
        False, description="run the snapshot forwards and the attention maps as torch.compile'd kernels (fused "
        "BatchNorm/ReLU/attention passes): the same math up to float rounding, a review step 6-23% faster on "
        "CPU in our runs (benchmarks/bench_methods.py). Costs a one-off compile of ~20-40 s (cached on disk) "
        "and needs a C++ compiler (and Triton on CUDA). Off by default so that short runs and tests do not "
        "pay the compile; the cifar100 preset turns it on")

    @model_validator(mode="after")
    def _check(self) -> TSKDParams:
        if min(self.taps) < 0 or len(set(self.taps)) != len(self.taps):
            raise ValueError(f"taps must be distinct tap indices >= 0, got {list(self.taps)}")
        if self.hidden_channels is not None and len(self.hidden_channels) != len(self.taps):
            raise ValueError(f"hidden_channels needs one width per tap ({len(self.taps)}), got "
                             f"{list(self.hidden_channels)}")
        return self


@register_method("tskd")
class TSKD(ReviewSchedule, Distiller):
    Params = TSKDParams

    def __init__(self, student, teacher, params: TSKDParams, ctx):
        super().__init__(student, teacher, params, ctx)
        self.check_schedule(params, epochs=ctx.epochs)
        s_taps = probe_taps(student, ctx.image_size).feats
        # "authors": what the architecture's authors' code calls pre-activation (the model says).
        self._teacher_taps = {"preact": "preact_feats", "post": "feats"}.get(params.teacher_taps) \
            or authors_preact(teacher)
        t_taps = getattr(probe_taps(teacher, ctx.image_size), self._teacher_taps)
        if max(params.taps) >= min(len(s_taps), len(t_taps)):
            raise ParamsError(f"TSKD pair {type(teacher).__name__} -> {type(student).__name__}: methods.tskd.taps "
                             f"{list(params.taps)} needs taps up to {max(params.taps)}, but the teacher has "
                             f"{len(t_taps)} and the student {len(s_taps)} feature taps")
        hidden = params.hidden_channels or auto_hidden([s_taps[i][1:] for i in params.taps])
        # last_increment has no forecasters (empty): no weights to optimise, save or decay, and the
        # student alone gets a gradient in every step, so DDP need not look for unused parameters.
        convlstm = params.forecaster == "convlstm"
        self.forecasters = nn.ModuleList(IncrementForecaster(h) for h in hidden) if convlstm else nn.ModuleList()
        self.every_parameter_every_step = not convlstm
        self._recomputed = recomputed_branches(hidden, [s_taps[i][-2:] for i in params.taps]) \
            if params.recompute_forecasters else frozenset()
        self._monitors: dict[str, Tensor] = {}  # see take_monitors
        self.memory = SnapshotMemory(params.k)
        self._prefix = TapPrefix(student, max(params.taps), ctx.image_size, params.snapshot_bn == "train")
        self._compile_checked = False
        self._capture: dict[str, Any] | None = {}  # None: capture the next review step (capture_next_review)
        self._tap_sizes = [tuple(s_taps[i][-2:]) for i in params.taps]
        self._evolution = MapEvolution(student, params.taps, ctx.image_size, params.at_norm) \
            if params.evolution_images else None
        # The review step calls these two: the methods below, compiled when params.compile.
        self._frames_and_target = maybe_compiled(self._branch_inputs, params.compile, "the attention maps")
        # Attention maps inside the compiled region: their squares and norms fuse with the last
        # BatchNorm/ReLU pass instead of re-reading each full feature map.
        self._snapshot_maps = maybe_compiled(self._maps_of_snapshot, params.compile, "the snapshot forward")

    def _branch_inputs(self, memory: list[Tensor], s_feat: Tensor, t_feat: Tensor) -> tuple[Tensor, Tensor]:
        """One branch's increment frames (k, B, 1, H, W) and its target ``|S - T|`` (B, 1, H, W)."""
        p = self.params
        if t_feat.shape[-2:] != s_feat.shape[-2:]:  # authors: pool the teacher's features, then attend
            t_feat = F.adaptive_avg_pool2d(t_feat, s_feat.shape[-2:])
        s, t = attention_map(s_feat, p.at_norm), attention_map(t_feat, p.at_norm)
        sequence = increment_sequence if p.sequence == "increments" else raw_sequence
        frames = sequence(memory, s.detach() if p.detach_increment else s)
        target = review_target(s, t, p.target)
        return frames, target.detach() if p.detach_target else target

    def _maps_of_snapshot(self, snapshot: dict[str, Tensor], images: Tensor) -> list[Tensor]:
        feats = self._prefix(snapshot, images)
        return [attention_map(feats[tap], self.params.at_norm) for tap in self.params.taps]

    def teacher_train_mode(self) -> bool:
        return self.params.teacher_bn == "train"

    def snapshot_source(self) -> nn.Module:
        return self.student

    def keep_zeroed_grads(self) -> bool:
        # Without forecasters every parameter gets a gradient in every step: nothing to keep zeroed.
        return len(self.forecasters) > 0 and super().keep_zeroed_grads()

    def on_epoch_start(self, epoch: int) -> None:
        if self.params.compile and not self._compile_checked:
            check_compiles(next(self.student.parameters()).device)
            self._compile_checked = True
        self.check_memory_for(epoch)

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)  # stores a memory node's snapshot
        node = self._node(epoch)
        if self._evolution is not None and node.kind == "memory":
            self._evolution.record(self.memory.slot(node.slot), epoch, node.slot)

    def observers(self) -> list[Observer]:
        return [FigureRecorder(self)]

    # -- what FigureRecorder asks of the method (tskd.distill.tskd.recorder) ---------------------
    def watch(self, images: Tensor) -> dict[str, Tensor]:
        """Start following ``images`` (a batch of the test split, on the run's device); returns the
        teacher's attention maps of them, by map name, each (N, H, W) on the CPU."""
        if self._evolution is None:
            return {}
        self._evolution.images = images
        teacher, was_training = self.teacher, self.teacher.training
        teacher.eval()  # running statistics, and a train-mode teacher (teacher_bn) must not update them
        try:
            _, t_taps = self.teacher_forward(images, eager=True)
        finally:
            teacher.train(was_training)
        return self._evolution.reference(t_taps[self._teacher_taps], self._tap_sizes)

    def take_evolution(self) -> list[dict[str, Any]]:
        """The student's maps of the watched images recorded since the last call (one entry per memory
        node: ``{"epoch", "label", "maps"}``); taking them clears them."""
        return self._evolution.take() if self._evolution is not None else []

    def forward_train(self, images, labels, epoch, indices=None):
        p = self.params
        logits, taps = self.student(images)
        t_logits, t_taps = self.teacher_forward(images)
        losses = {"ce": p.ce_weight * F.cross_entropy(logits, labels),
                  "kd": p.kd_weight * kd_loss(logits, t_logits, p.T)}
        if self._node(epoch).kind == "review":
            losses["review"] = p.review_weight * self.review_loss(images, taps["feats"], t_taps[self._teacher_taps])
        return logits, losses

    def review_loss(self, images: Tensor, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
        """``sum_l MSE(P_l, |S_l - T_l|)`` over the branches, P_l forecast from the increments (or what
        ``target``, ``sequence`` and ``forecaster`` put in their place). With ``measure_predictability``,
        also keeps that sum unweighted and the same sum with the last frame as the forecast, for
        ``take_monitors``."""
        p = self.params
        # The snapshots run channels-last whatever the student's layout: oneDNN runs their early,
        # wide-map convolutions 15-35% faster so on CPU, and only their attention maps (one
        # channel) leave this function.
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():  # maps at once: k sets of full feature maps need not stay alive
            memory = [self._snapshot_maps(snapshot, images) for snapshot in self.memory.snapshots()]
        loss = images.new_zeros(())
        forecast_mse = last_mse = None
        for branch, tap in enumerate(p.taps):
            frames, target = self._frames_and_target([maps[branch] for maps in memory], s_feats[tap], t_feats[tap])
            pred = forecast(self.forecasters[branch], frames, branch in self._recomputed) if self.forecasters \
                else frames[-1]
            if branch == 0 and self._capture is None:
                self._capture = _review_capture(tap, frames, pred, target)
            mse = F.mse_loss(pred, target)
            loss = loss + mse
            if p.measure_predictability:  # detached copies: the loss and its gradients stay as they are
                with torch.no_grad():
                    last = F.mse_loss(frames[-1].detach(), target.detach())
                forecast_mse = mse.detach() if forecast_mse is None else forecast_mse + mse.detach()
                last_mse = last if last_mse is None else last_mse + last
        if p.measure_predictability:
            self._monitors = {"forecast_mse": forecast_mse, "last_increment_mse": last_mse}
        return loss

    def take_monitors(self) -> dict[str, Tensor]:
        out, self._monitors = self._monitors, {}
        return out

    def derived_monitors(self, means: dict[str, float]) -> dict[str, float]:
        """``predictability`` = forecast MSE ÷ last-frame MSE of the epoch (< 1: the forecast beats
        "no change"); left out where the last frame matched the target exactly (a ratio of nothing)."""
        if means.get("last_increment_mse"):
            return {"predictability": means["forecast_mse"] / means["last_increment_mse"]}
        return {}

    def capture_next_review(self) -> None:
        """Keep a copy of the next review step's first branch for ``take_capture`` (the copies cost a
        host transfer: made only when a recorder asks)."""
        self._capture = None

    def take_capture(self) -> dict[str, Any] | None:
        """The review step's first branch asked for by ``capture_next_review`` (see ``_review_capture``),
        as JSON-ready lists; None: nothing since the last call."""
        out = self._capture
        if out:
            self._capture = {}  # taken: a later review step is not captured again
        return out or None


def _review_capture(tap: int, frames: Tensor, forecast: Tensor, target: Tensor) -> dict[str, Any]:
    """The first image's k increment frames, the forecast and the target |S - T| of one branch, as
    lists (H x W each) for the report's figure: copies, read after the step's numbers are taken."""
    def grid(x: Tensor) -> list[list[float]]:
        # 4 significant digits: right after a snapshot |S - Mk| is ~1e-5, which fixed decimals would lose.
        return [[float(f"{v:.4g}") for v in row] for row in x.detach().float().cpu().tolist()]

    return {"tap": tap, "frames": [grid(f[0, 0]) for f in frames], "forecast": grid(forecast[0, 0]),
            "target": grid(target[0, 0])}
