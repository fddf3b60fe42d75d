"""The shape of a task (see ``tskd.tasks``) and the epoch summary every task shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch


class TrainMeter(Protocol):
    """What a training epoch accumulates from the outputs (on the device; read once per epoch)."""

    def update(self, outputs: Any, targets: Any) -> None: ...

    def totals(self) -> list[float]:
        """Sums that add over steps and over ranks (a data-parallel epoch sums them)."""

    def result(self, totals: Sequence[float], n: int) -> dict[str, float]:
        """The epoch's figures (without the ``train_`` prefix) from the summed totals over n samples."""


class Task(Protocol):
    name: str
    title: str  # what the report's figures are, e.g. "Test accuracy (%)"
    best: str  # the evaluation figure that picks the best epoch; higher is better
    figures: tuple[str, ...]  # the figures reported for the best and the last epoch, ``best`` first
    labels: dict[str, str]  # how a report names each figure

    def to_device(self, batch: Any, rt: Any) -> tuple[Any, Any, torch.Tensor]:
        """The batch on the run's device, laid out as the runtime says (``Runtime.place_batch``)."""

    def count(self, targets: Any) -> int: ...

    def train_meter(self, device: torch.device) -> TrainMeter: ...

    def inference(self, model: torch.nn.Module) -> Callable[[Any], Any]:
        """What ``evaluate`` calls for a bare model of the family (an exported or imported file)."""

    def evaluate(self, forward: Callable[[Any], Any], loader: Any, rt: Any, world: Any = ...) -> dict[str, float]:
        """The figures of one split; in a data-parallel run ``loader`` is this rank's shard and the
        result is the whole split's, the same on every rank."""

    def summarize(self, history: list[dict[str, Any]]) -> dict[str, Any]: ...


def summarize_epochs(history: list[dict[str, Any]], best: str, figures: Sequence[str]) -> dict[str, Any]:
    """metrics.json's figures from the per-epoch rows (``test_<figure>``, and ``val_<figure>`` with a
    validation split).

    ``best_*`` are the figures of the best epoch, the one of highest ``test_<best>`` (the first of
    equals): the mdistiller / TSKD authors' figure; every ``best_<figure>`` is that epoch's, not the
    highest of any epoch. ``last_*`` are the final epoch's (RepDistiller's figure). With a
    validation split, ``selected_*`` are the test figures of the epoch of highest ``val_<best>``.
    """
    top = max(history, key=lambda r: r[f"test_{best}"])
    last = history[-1]
    m: dict[str, Any] = {f"best_{f}": top[f"test_{f}"] for f in figures} | {"best_epoch": top["epoch"]}
    m |= {f"last_{f}": last[f"test_{f}"] for f in figures}
    if f"val_{best}" in last:
        sel = max(history, key=lambda r: r[f"val_{best}"])
        m |= {"selected_epoch": sel["epoch"]} | {f"selected_{f}": sel[f"test_{f}"] for f in figures}
    return m
