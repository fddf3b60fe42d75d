"""The progress line: one log line per epoch, on the main rank."""

from __future__ import annotations

import logging
from typing import Any

from tskd.engine.events import Observer, RunView

log = logging.getLogger("tskd.train")


class ProgressLog(Observer):
    """``<arch> epoch 3/40 lr 0.05 loss 1.2345 test top1 61.20 top5 87.10 (12.3s)``, numbered from 1
    as every file and record numbers epochs."""

    name = "progress"

    def on_epoch_end(self, run: RunView, epoch: int, row: dict[str, Any]) -> None:
        if not run.world.main:
            return
        test = " ".join(f"{f} {row[f'test_{f}']:.2f}" for f in run.task.figures)
        log.info("%s epoch %d/%d lr %.4g loss %.4f test %s (%.1fs)", run.spec.arch, epoch + 1,
                 run.spec.recipe.epochs, row["lr"], row["train_loss"], test, row["seconds"])
