"""Image classification (CIFAR-100, ImageNet): top-1 picks the best epoch; top-1 and top-5 are reported."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tskd.data.integrity import DatasetError
from tskd.engine import distributed
from tskd.engine.distributed import SINGLE, World
from tskd.engine.runtime import Runtime
from tskd.tasks.base import summarize_epochs


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


class _TrainTop1:
    """Correct predictions of the training epoch, counted on the device (no host sync per step)."""

    def __init__(self, device: torch.device):
        self.correct = torch.zeros((), dtype=torch.long, device=device)

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        self.correct += (outputs.detach().argmax(1) == targets).sum()

    def totals(self) -> list[float]:
        return [float(self.correct)]

    def result(self, totals: Sequence[float], n: int) -> dict[str, float]:
        return {"top1": 100.0 * totals[0] / max(n, 1)}


@dataclass(frozen=True)
class Classification:
    name: str = "classification"
    title: str = "Test accuracy (%)"
    best: str = "top1"
    figures: tuple[str, ...] = ("top1", "top5")
    labels: dict[str, str] = field(default_factory=lambda: {"top1": "top-1", "top5": "top-5"})

    def to_device(self, batch: Any, rt: Runtime) -> tuple[Tensor, Tensor, Tensor]:
        images, labels, indices = batch
        return rt.place_batch(images), rt.place_batch(labels), rt.place_batch(indices)

    def count(self, targets: Tensor) -> int:
        return int(targets.shape[0])

    def inference(self, model: torch.nn.Module) -> Callable[[Tensor], Tensor]:
        """A registered model's evaluation forward: its logits (the taps are dropped)."""
        return lambda x: model(x)[0]

    def train_meter(self, device: torch.device) -> _TrainTop1:
        return _TrainTop1(device)

    @torch.no_grad()
    def evaluate(self, forward: Callable[[Tensor], Tensor], loader, rt: Runtime, world: World = SINGLE
                 ) -> dict[str, float]:
        """Accuracy (percent) and mean cross-entropy of ``forward`` over ``loader``; in a
        data-parallel run, over every rank's shard (counts summed over ranks)."""
        n = c1 = c5 = 0
        loss = 0.0
        for batch in loader:
            images, labels = rt.place_batch(batch[0]), rt.place_batch(batch[1])
            with rt.autocast():
                logits = forward(images)
            logits = logits.float()
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            a, b = topk_correct(logits, labels)
            c1, c5, n = c1 + a, c5 + b, n + labels.shape[0]
        if world.distributed:
            c1, c5, loss, n = distributed.sum_values([c1, c5, loss, n], rt.device)
        if n == 0:
            raise DatasetError("the evaluation set is empty")
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}

    def summarize(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return summarize_epochs(history, self.best, self.figures)


CLASSIFICATION = Classification()
