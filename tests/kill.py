"""Killing a training run at a chosen step, through the loop's public events: an observer that raises
``KeyboardInterrupt`` (what Ctrl-C, or SLURM's signal turned into an exception, would be) from
``on_step``. The step's update is then made but not checkpointed, as when a job dies inside it."""

from __future__ import annotations

from typing import Any

from tskd.engine.events import Observer, RunView


class KillAt(Observer):
    """Raise at step ``step`` (0-based) of epoch ``epoch`` (0-based): the run's checkpoint then holds
    the epochs before it (and, with train.checkpoint_minutes, the steps of ``epoch`` checkpointed)."""

    name = "kill"

    def __init__(self, epoch: int, step: int = 0) -> None:
        self.epoch, self.step = epoch, step

    def on_step(self, run: RunView, epoch: int, step: int, losses: dict[str, Any]) -> None:
        if (epoch, step) == (self.epoch, self.step):
            raise KeyboardInterrupt(f"killed at epoch {epoch} step {step}")
