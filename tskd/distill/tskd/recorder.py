"""TSKD's figures of a run, recorded by an observer of the training loop (tskd.engine.events).

- the *capture*: one review step's increment frames, forecast and target of the first branch, kept
  once per run and written into metrics.json (``capture``) for the report's review figure;
- the *evolution*: the student's attention maps of a few fixed test images at every memory node,
  beside the teacher's, written to ``evolution.npz`` for the report's evolution grid.

Neither is part of the run's identity, and no number of the run depends on them. Both are kept in
the checkpoints, so a resumed run goes on with what it had recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tskd.engine.events import Observer, RunView
from tskd.engine.evolution import EVOLUTION_FILE, shown_images, watched_indices, write_evolution


class FigureRecorder(Observer):
    name = "evolution"  # the key of its state in checkpoints (and of its entries in older ones)

    def __init__(self, distiller) -> None:
        self.distiller = distiller  # a TSKD distiller: take_capture, watch, take_evolution
        self.capture: dict[str, Any] | None = None
        self.evolution: list[dict[str, Any]] = []
        self.watched: dict[str, Any] | None = None

    def on_resume(self, run: RunView, state: dict[str, Any] | None, epoch: int, step: int | None) -> None:
        if state:
            self.capture = state.get("capture")
            self.evolution = list(state.get("evolution", []))

    def on_run_start(self, run: RunView) -> None:
        """Ask for the first review step's capture (unless a resumed run has it), and hand the method
        its fixed test images: spread evenly over the test split, taken with its deterministic test
        transform (no RNG is drawn). The images on the main rank only: the others write no files."""
        if self.capture is None:
            self.distiller.capture_next_review()
        n = self.distiller.params.evolution_images if run.world.main else 0
        if not n:
            return
        data = run.data
        indices = watched_indices(len(data.test), n)
        items = [data.test[i] for i in indices]
        images = torch.stack([item[0] for item in items])
        reference = self.distiller.watch(run.runtime.place_batch(images))
        targets = [int(item[1]) for item in items]
        names = [data.classes[t] if t < len(data.classes) else str(t) for t in targets]
        self.watched = {"indices": indices, "images": shown_images(images, data.mean, data.std),
                        "reference": reference, "targets": targets, "class_names": names}

    def on_epoch_end(self, run: RunView, epoch: int, row: dict[str, Any]) -> None:
        captured = self.distiller.take_capture()
        if captured is not None and self.capture is None:
            self.capture = {"epoch": epoch + 1, **captured}
        self.evolution += self.distiller.take_evolution()

    def on_result(self, run: RunView, metrics: dict[str, Any]) -> list[Path]:
        if self.capture is not None:
            metrics["capture"] = self.capture
        if not run.world.main:
            return []
        path = run.out / EVOLUTION_FILE
        if self.watched is None:  # an earlier run's in this directory (other params) must not pass for this one's
            path.unlink(missing_ok=True)
            return []
        w = self.watched
        write_evolution(path, w["images"], w["indices"], w["reference"], self.evolution,
                        targets=w["targets"], class_names=w["class_names"])
        return [path]

    def state_dict(self) -> dict[str, Any]:
        return {"capture": self.capture, "evolution": self.evolution}
