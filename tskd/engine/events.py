"""The training loop's events, and the observers that act on them.

The loop (tskd.engine.trainer) trains; everything else that happens during a run listens to it:
the tracker (tskd.tracking.observer), a method's own recorders (TSKD's evolution recorder, given by
``Distiller.observers``), the progress line (tskd.engine.progress). A new tracker or recorder is a
new ``Observer`` subclass handed to the trainer; the loop is not edited for it.

An observer must not change anything the run computes: no RNG draws, no writes to the networks.
Its ``state_dict`` goes into every checkpoint, so that a resumed run goes on with what the observer
had gathered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: this module imports neither torch nor the loop
    from torch import Tensor, nn

    from tskd.engine.distributed import World
    from tskd.engine.loaders import RunData
    from tskd.engine.runtime import Runtime
    from tskd.spec.grid import RunSpec
    from tskd.tasks import Task


@dataclass(frozen=True)
class RunView:
    """What an observer may read of the run (read, never change)."""

    spec: RunSpec
    out: Path  # the run's directory
    key: str  # the run's content key (its identity's fingerprint)
    identity: dict[str, Any]  # everything that decides the result (tskd.engine.trainer.run_identity)
    tags: dict[str, str]  # facts about the run found while setting it up (teacher input, dataset)
    data: RunData
    task: Task
    world: World
    runtime: Runtime
    distiller: nn.Module


class Observer:
    """Base observer: every event is optional; the defaults do nothing.

    Order of events in one attempt: ``on_discarded`` or ``on_resume`` (if a checkpoint was found),
    ``on_run_start``, then per epoch ``on_step`` (every optimiser step), ``on_evaluation`` and
    ``on_epoch_end``; then ``on_result`` and ``on_run_end``, or ``on_run_failed``. A run that finds
    its result already in its directory trains nothing and sends no event.
    """

    name: ClassVar[str] = ""  # the key of its state in checkpoints; unique among a run's observers

    def on_discarded(self, run: RunView, checkpoint: dict[str, Any]) -> None:
        """A checkpoint in the run's directory was written for another identity and is set aside."""

    def on_resume(self, run: RunView, state: dict[str, Any] | None, epoch: int, step: int | None) -> None:
        """The run goes on from a checkpoint after ``epoch`` whole epochs (and ``step`` steps into the
        next one, if not None); ``state`` is this observer's ``state_dict`` saved there (None: none)."""

    def on_run_start(self, run: RunView) -> None:
        """Before the first epoch of this attempt, fresh or resumed."""

    def on_step(self, run: RunView, epoch: int, step: int, losses: dict[str, Tensor]) -> None:
        """After the optimiser step ``step`` (0-based within ``epoch``); ``losses`` stay on the device
        (reading them makes the host wait for it). Only observers that define it are called."""

    def on_evaluation(self, run: RunView, epoch: int, results: dict[str, float]) -> None:
        """After ``epoch`` (0-based) was evaluated: ``results`` by ``<split>_<figure>``."""

    def on_epoch_end(self, run: RunView, epoch: int, row: dict[str, Any]) -> None:
        """``epoch`` (0-based) is done and ``row`` is its history row; its checkpoint comes next."""

    def on_result(self, run: RunView, metrics: dict[str, Any]) -> list[Path]:
        """The run is complete. Add what belongs in metrics.json to ``metrics`` (on every rank), write
        the observer's own files (main rank), and return them: the result's files to publish."""
        return []

    def on_run_end(self, run: RunView, metrics: dict[str, Any], files: list[Path]) -> None:
        """metrics.json and model.pt are written (``files``: theirs, then every observer's own)."""

    def on_run_failed(self, run: RunView, error: BaseException) -> None:
        """The attempt ends with ``error`` (a kill included); its checkpoint, if any, stays."""

    def state_dict(self) -> dict[str, Any] | None:
        """What to keep in checkpoints (JSON or tensors); None: nothing."""
        return None


def overrides(observer: Observer, event: str) -> bool:
    """Whether ``observer`` defines ``event`` itself (per-step events go only to those)."""
    return getattr(type(observer), event) is not getattr(Observer, event)
