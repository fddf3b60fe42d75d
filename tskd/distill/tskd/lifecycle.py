"""The node schedule's hooks, shared by TSKD on classification and on detection (docs/method.md):
which node an epoch is, the snapshot a memory node stores, the check that a review node reviews
the snapshots of its own cycle (also after a resume), and what SGD does to the forecasters
between reviews."""

from __future__ import annotations

from torch import nn

from tskd.config import ParamsError
from tskd.distill.tskd.schedule import Node, cycle_memory_epochs, node_at, schedule_problem


class ReviewSchedule:
    """Mixin of a TSKD distiller: needs ``self.params`` (delta, k, forecaster_between_reviews),
    ``self.ctx.epochs``, ``self.memory`` (a SnapshotMemory) and ``snapshot_source()``."""

    every_parameter_every_step = False  # the forecasters train in review epochs only

    @classmethod
    def check_schedule(cls, params, *, epochs: int) -> None:
        problem = schedule_problem(epochs, params.delta, params.k)
        if problem:
            raise ParamsError(problem)

    def keep_zeroed_grads(self) -> bool:
        return self.params.forecaster_between_reviews == "decay"

    def _node(self, epoch: int) -> Node:
        return node_at(epoch, self.ctx.epochs, self.params.delta, self.params.k)

    def snapshot_source(self) -> nn.Module:
        """The module whose weights a memory node stores."""
        raise NotImplementedError

    def check_memory_for(self, epoch: int) -> None:
        """A review must use the k snapshots of its own cycle (also after a resume)."""
        if self._node(epoch).kind == "review" and (
                self.memory.epochs != (want := cycle_memory_epochs(epoch, self.params.delta, self.params.k))):
            raise RuntimeError(f"TSKD review epoch {epoch} needs snapshots from epochs {want}, "
                               f"memory holds {self.memory.epochs}")

    def on_epoch_start(self, epoch: int) -> None:
        self.check_memory_for(epoch)

    def on_epoch_end(self, epoch: int) -> None:
        node = self._node(epoch)
        if node.kind == "memory":
            self.memory.store(node.slot, self.snapshot_source(), epoch)
