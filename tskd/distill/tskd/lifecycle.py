"""The node schedule's hooks, shared by TSKD on classification and on detection (docs/method.md):
which node an epoch (or a step) is, the snapshot a memory node stores, the check that a review node
reviews the snapshots of its own cycle (also after a resume), and what SGD does to the forecasters
between reviews.

The schedule runs in epochs (the authors': a node is a whole epoch) or, where the params have
``schedule_unit: iterations`` (detection, whose published recipes count iterations), in training
steps: a node starts every ``delta`` steps and lasts ``node_iters`` steps (default ``delta``), a
memory node snapshots the student after its last step, a review node adds the review loss to each
of its steps. With ``delta`` = one epoch's steps and ``node_iters`` = ``delta`` it is the epoch
schedule with ``delta`` 1, step for step.
"""

from __future__ import annotations

from torch import nn

from tskd.distill.tskd.schedule import Node, cycle_memory_epochs, node_at, schedule_problem
from tskd.errors import ParamsError


class ReviewSchedule:
    """Mixin of a TSKD distiller: needs ``self.params`` (delta, k, forecaster_between_reviews; optionally
    schedule_unit and node_iters), ``self.ctx`` (epochs, steps_per_epoch), ``self.memory`` (a
    SnapshotMemory) and ``snapshot_source()``."""

    every_parameter_every_step = False  # the forecasters train in review epochs only
    _step_node: Node | None = None  # the current step's node (iteration schedule)

    @classmethod
    def check_schedule(cls, params, *, epochs: int, steps_per_epoch: int | None = None) -> None:
        """Refuse a schedule without a review node. An iteration schedule is checked once the run knows
        its steps per epoch (``None``: not yet, as when a preset is checked without its data)."""
        if getattr(params, "schedule_unit", "epochs") == "iterations":
            if steps_per_epoch is None:
                return
            problem = schedule_problem(epochs * steps_per_epoch, params.delta, params.k, unit="step")
        else:
            problem = schedule_problem(epochs, params.delta, params.k)
        if problem:
            raise ParamsError(problem)

    def keep_zeroed_grads(self) -> bool:
        return self.params.forecaster_between_reviews == "decay"

    @property
    def by_steps(self) -> bool:
        return getattr(self.params, "schedule_unit", "epochs") == "iterations"

    def _node(self, epoch: int) -> Node:
        return node_at(epoch, self.ctx.epochs, self.params.delta, self.params.k)

    def _span(self) -> int:
        return self.params.node_iters or self.params.delta

    def _node_at_step(self, step: int) -> tuple[Node, int]:
        """The node that ``step`` (0-based, counted over the run) lies in, and the step it started at."""
        start = step - step % self.params.delta
        if step - start >= self._span():
            return Node("general"), start
        total = self.ctx.epochs * self.ctx.steps_per_epoch
        return node_at(start, total, self.params.delta, self.params.k), start

    def reviewing(self, epoch: int) -> bool:
        """Whether the current step adds the review loss."""
        if self.by_steps:
            return self._step_node is not None and self._step_node.kind == "review"
        return self._node(epoch).kind == "review"

    def snapshot_source(self) -> nn.Module:
        """The module whose weights a memory node stores."""
        raise NotImplementedError

    def _check_memory(self, review_start: int) -> None:
        want = cycle_memory_epochs(review_start, self.params.delta, self.params.k)
        if self.memory.epochs != want:
            unit = "step" if self.by_steps else "epoch"
            raise RuntimeError(f"TSKD review {unit} {review_start} needs snapshots from {unit}s {want}, "
                               f"memory holds {self.memory.epochs}")

    def check_memory_for(self, epoch: int) -> None:
        """A review must use the k snapshots of its own cycle (also after a resume)."""
        if not self.by_steps and self._node(epoch).kind == "review":
            self._check_memory(epoch)

    def on_epoch_start(self, epoch: int) -> None:
        self.check_memory_for(epoch)

    def on_epoch_end(self, epoch: int) -> None:
        if self.by_steps:
            return
        node = self._node(epoch)
        if node.kind == "memory":
            self.memory.store(node.slot, self.snapshot_source(), epoch)

    def on_step_start(self, step: int) -> None:
        if not self.by_steps:
            return
        self._step_node, start = self._node_at_step(step)
        if self._step_node.kind == "review":
            self._check_memory(start)  # every review step: a tuple comparison, and resume-proof

    def on_step_end(self, step: int) -> None:
        if not self.by_steps:
            return
        node, start = self._node_at_step(step)
        if node.kind == "memory" and step - start == self._span() - 1:
            # Labelled with the node's first step, as an epoch node is with its epoch.
            self.memory.store(node.slot, self.snapshot_source(), start)
