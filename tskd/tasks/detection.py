"""Object detection (COCO): box AP by pycocotools' COCOeval picks the best epoch; AP, AP50, AP75
and the small/medium/large APs are reported.

A batch is ``(images, targets, indices)``: lists of CHW images in [0, 1] (sizes differ; the
detector resizes and normalises them itself) and of target dicts (``boxes`` XYXY, ``labels``
category ids, ``image_id``). The evaluation split carries the pycocotools ``COCO`` of its
annotation file (``.coco``); the detector's eval forward returns, per image, ``boxes`` in that
image's own coordinates, ``labels`` and ``scores``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tskd.data.integrity import DatasetError
from tskd.engine.distributed import SINGLE, World
from tskd.engine.runtime import Runtime
from tskd.tasks.base import summarize_epochs

# COCOeval's stats[0:6], in its order.
FIGURES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


class _NoTrainFigures:
    """Detection has no per-step training figure besides its losses (which the loop sums itself)."""

    def update(self, outputs: Any, targets: Any) -> None:
        pass

    def totals(self) -> list[float]:
        return []

    def result(self, totals: Sequence[float], n: int) -> dict[str, float]:
        return {}


def ground_truth(dataset: Any):
    """The pycocotools COCO of an evaluation split (also through a rank's ``Subset`` shard)."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.coco


def to_coco_results(detections: list[dict[str, Tensor]], image_ids: list[int]) -> list[dict[str, Any]]:
    """COCO's result format: one dict per box, ``bbox`` as [x, y, width, height]."""
    out = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].detach().float().cpu()
        if len(boxes) == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for b, label, score in zip(xywh, det["labels"].tolist(), det["scores"].float().tolist(), strict=True):
            out.append({"image_id": int(image_id), "category_id": int(label), "bbox": b, "score": score})
    return out


def coco_box_ap(gt, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """COCOeval's bbox figures (percent) of ``results`` over the images ``image_ids``."""
    from pycocotools.cocoeval import COCOeval

    if not results:  # loadRes refuses an empty list; no detection scores 0 everywhere
        return dict.fromkeys(FIGURES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its tables
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval gives -1 where a size range has no ground truth: reported as 0, not as a negative AP.
    return {name: 100.0 * max(float(v), 0.0) for name, v in zip(FIGURES, ev.stats[:6], strict=True)}


@dataclass(frozen=True)
class Detection:
    name: str = "detection"
    title: str = "Box AP (%, pycocotools COCOeval, IoU 0.50:0.95 unless named)"
    best: str = "AP"
    figures: tuple[str, ...] = FIGURES
    labels: dict[str, str] = field(default_factory=lambda: {
        "AP": "box AP", "AP50": "AP50", "AP75": "AP75", "APs": "AP small", "APm": "AP medium", "APl": "AP large"})

    def to_device(self, batch: Any, rt: Runtime) -> tuple[list[Tensor], list[dict[str, Any]], Tensor]:
        images, targets, indices = batch
        images = [rt.place_batch(im) for im in images]
        targets = [{k: rt.place_batch(v) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
        return images, targets, rt.place_batch(torch.as_tensor(indices))

    def count(self, targets: list[dict[str, Any]]) -> int:
        return len(targets)

    def inference(self, model: torch.nn.Module) -> Callable[[list[Tensor]], list[dict[str, Tensor]]]:
        """A detector's evaluation forward: torchvision's own (detections in each image's coordinates)."""
        return model

    def train_meter(self, device: torch.device) -> _NoTrainFigures:
        return _NoTrainFigures()

    @torch.no_grad()
    def evaluate(self, forward: Callable[[list[Tensor]], list[dict[str, Tensor]]], loader, rt: Runtime,
                 world: World = SINGLE) -> dict[str, float]:
        """Box AP of ``forward``'s detections over the split (every rank's shard, gathered)."""
        results: list[dict[str, Any]] = []
        image_ids: list[int] = []
        for images, targets, _ in loader:
            ids = [int(t["image_id"]) for t in targets]
            with rt.autocast():
                detections = forward([rt.place_batch(im) for im in images])
            results += to_coco_results(detections, ids)
            image_ids += ids
        if world.distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world.size
            dist.all_gather_object(gathered, (results, image_ids))
            results = [r for part, _ in gathered for r in part]
            image_ids = [i for _, part in gathered for i in part]
        if not image_ids:
            raise DatasetError("the evaluation set is empty")
        return coco_box_ap(ground_truth(loader.dataset), results, image_ids)

    def summarize(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return summarize_epochs(history, self.best, self.figures)


DETECTION = Detection()
