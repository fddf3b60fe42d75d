"""Top-1 / top-5 accuracy of a classifier over a data loader."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

from tskd.data.integrity import DatasetError


def topk_correct(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == labels[:, None]
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(forward: Callable[[Tensor], Tensor], loader, device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    """Accuracy (percent) and mean cross-entropy of ``forward`` over ``loader``."""
    n = c1 = c5 = 0
    loss = 0.0
    for batch in loader:
        images, labels = batch[0].to(device), batch[1].to(device)
        with autocast():
            logits = forward(images)
        logits = logits.float()
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        a, b = topk_correct(logits, labels)
        c1, c5, n = c1 + a, c5 + b, n + labels.shape[0]
    if n == 0:
        raise DatasetError("the evaluation set is empty")
    return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "loss": loss / n}
