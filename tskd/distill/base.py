"""The one interface every distillation method implements.

A ``Distiller`` owns the student, the frozen teacher (if any) and its own trainable
extras (connectors, ConvLSTMs...). The trainer only ever talks to this interface, so
adding a method means adding one module that registers itself; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

if TYPE_CHECKING:
    from tskd.engine.events import Observer


class MethodParams(BaseModel):
    """Base of every method's typed params: unknown keys are an error, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class DistillContext:
    """What a method may need to know about the run, beyond the two networks."""

    num_classes: int
    image_size: tuple[int, int]  # (H, W) of a training image, to probe feature-tap shapes
    epochs: int  # total training epochs (schedules, warm-ups)
    num_train: int  # size of the training set (memory banks indexed by sample)
    train_labels: Tensor | None = None  # label of every training sample, by index
    steps_per_epoch: int | None = None  # training steps of an epoch (schedules in iterations)
    classes: tuple[str, ...] = ()  # class names by label; "" for a label the dataset does not use (COCO's gaps)


class Distiller(nn.Module):
    """Base distiller.

    A method sets ``Params`` and implements ``forward_train``; that is all most methods need (KD,
    AT, FitNet, DKD). Optional, each with a default that does nothing:

    - ``needs_teacher`` (False: no teacher), ``check_schedule`` (refuse params for a run's length);
    - a schedule's hooks: ``on_epoch_start``/``on_epoch_end``, ``on_step_start``/``on_step_end``;
    - measurements beside the loss: ``take_monitors``/``derived_monitors``;
    - what the method records beside training, as observers of the loop: ``observers``;
    - how it trains, where it differs from plain SGD on every parameter: ``teacher_train_mode``,
      ``keep_zeroed_grads``, ``every_parameter_every_step``.

    The base provides the rest: ``teacher`` and ``teacher_forward`` (frozen, renormalised when the
    recipe says so), ``trainable_parameters``, and ``forward`` (inference: the student's logits).
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = True
    task: ClassVar[str] = "classification"  # set by register_method

    def __init__(self, student: nn.Module, teacher: nn.Module | None, params: MethodParams,
                 ctx: DistillContext):
        super().__init__()
        self.student = student
        self.params = params
        self.ctx = ctx
        if teacher is not None:
            teacher.requires_grad_(False)
        # Stored outside the module tree so the teacher is never in state_dict() or
        # trainable_parameters(): its weights come from its own file and stay frozen.
        self._teacher = [teacher] if teacher is not None else []
        # Per-channel affine map from the student's input tensor to the teacher's (None: the
        # teacher sees the student's tensor). Not saved: the trainer sets it from the files.
        self.register_buffer("_teacher_scale", None, persistent=False)
        self.register_buffer("_teacher_shift", None, persistent=False)

    def renormalize_teacher_input(self, student_mean, student_std, teacher_mean, teacher_std) -> None:
        """Feed the teacher the same images normalised with its own statistics:
        ``(x * std_s + mean_s - mean_t) / std_t`` per channel, instead of the student's ``x``."""
        s_mean, s_std, t_mean, t_std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                                        for v in (student_mean, student_std, teacher_mean, teacher_std))
        self._teacher_scale = s_std / t_std
        self._teacher_shift = (s_mean - t_mean) / t_std

    def observers(self) -> list[Observer]:
        """What the method records beside training, as observers of the loop's events
        (tskd.engine.events; TSKD: its review capture and attention-map evolution). Called once,
        when the run is set up."""
        return []

    # Measurements that are not loss terms come through their own channel, not as entries of
    # forward_train's dict: that dict is "the terms to sum" for the trainer, the benchmarks and the
    # tests alike, and a measurement in it would be added to the loss wherever a caller summed it.
    def take_monitors(self) -> dict[str, Tensor]:
        """What the last ``forward_train`` measured beside its loss terms (TSKD: how well the forecast
        predicts its target), as detached 0-dim tensors left on the device (the trainer sums them per
        epoch, weighted by the batch as the loss terms are, and reads them at the epoch's end: no host
        sync per step); {}: nothing this step. Taking them clears them. No number of the run may depend
        on them."""
        return {}

    def derived_monitors(self, means: dict[str, float]) -> dict[str, float]:
        """Figures computed from an epoch's monitor means (``take_monitors``' keys), added to its history
        row beside them as ``train_<name>`` (TSKD: the ratio of two MSEs)."""
        return {}

    @property
    def teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError(f"{type(self).__name__} has no teacher")
        return self._teacher[0]

    def _apply(self, fn, recurse=True):  # keep the hidden teacher on the same device/dtype
        super()._apply(fn, recurse)
        for t in self._teacher:
            t._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for t in self._teacher:
            # Frozen teachers keep their BatchNorm running statistics (eval mode) unless a
            # method deliberately says otherwise (see TSKD's teacher_bn).
            t.train(mode and self.teacher_train_mode())
        return self

    @classmethod
    def check_schedule(cls, params: MethodParams, *, epochs: int) -> None:
        """Refuse params that cannot work with a run of ``epochs`` epochs (raise ValueError
        naming the param and what is allowed). Called when params are validated, before any
        training starts."""

    def teacher_train_mode(self) -> bool:
        return False

    # Whether every trainable parameter gets a gradient in every step; a method whose modules sit out
    # some steps says False (data-parallel training then looks for unused parameters each step).
    every_parameter_every_step: ClassVar[bool] = True

    def keep_zeroed_grads(self) -> bool:
        """Whether the optimizer's ``zero_grad`` fills gradients with zeros instead of clearing them.

        The same for every parameter that gets a gradient in every step. It differs for a module
        that gets gradients only in some epochs (TSKD's forecasters): kept zero gradients make SGD
        go on applying weight decay and momentum to it in the others, as torch < 2.0 did."""
        return False

    def forward(self, images: Tensor) -> Tensor:
        """Inference: the student's logits."""
        return self.student(images)[0]

    def forward_train(self, images: Tensor, labels: Tensor, epoch: int,
                      indices: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One training forward: the student's logits and the named loss terms to sum."""
        raise NotImplementedError

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Everything the optimizer updates: the student plus the method's own modules."""
        return (p for p in self.parameters() if p.requires_grad)

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first batch of ``epoch`` (0-based)."""

    def on_epoch_end(self, epoch: int) -> None:
        """Called after the last batch of ``epoch``, before evaluation and checkpointing."""

    def on_step_start(self, step: int) -> None:
        """Called before each training step; ``step`` is 0-based and counted over the whole run."""

    def on_step_end(self, step: int) -> None:
        """Called after each training step's optimiser step (before any mid-epoch checkpoint)."""

    def teacher_forward(self, images: Tensor, eager: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """The frozen teacher's logits and taps of ``images`` (renormalised for it when the recipe says
        so). ``eager``: its plain ``forward``, past a ``train.compile`` wrapper, for a one-off batch
        whose shape or mode the compiled graph has not seen (it would compile again for it)."""
        with torch.no_grad():
            if self._teacher_scale is not None:
                images = images * self._teacher_scale.to(images.dtype) + self._teacher_shift.to(images.dtype)
            return self.teacher.forward(images) if eager else self.teacher(images)
