"""TSKD's timeline of nodes (docs/method.md, "The node schedule"), as pure functions of (epoch, E, delta, k).

Every ``delta``-th epoch (0, delta, 2*delta, ...) is a node. Nodes cycle in groups of
``k + 1``: k memory nodes (the student is snapshotted into slot 0..k-1 at the end of the
epoch), then one review node (the temporal loss is added to every batch). All other
epochs are general epochs. Epochs are 0-based, as in the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NodeKind = Literal["memory", "review", "general"]


@dataclass(frozen=True)
class Node:
    """What happens in one epoch; ``slot`` is the memory slot a memory node fills (0-based)."""

    kind: NodeKind
    slot: int | None = None


def node_at(epoch: int, epochs: int, delta: int, k: int) -> Node:
    """The node of ``epoch`` in a run of ``epochs`` epochs with node spacing ``delta`` and ``k`` memories."""
    if delta < 1 or k < 1:
        raise ValueError(f"delta and k must be >= 1, got delta={delta}, k={k}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch {epoch} is outside a run of {epochs} epochs (0-based)")
    if epoch % delta:
        return Node("general")
    position = (epoch // delta) % (k + 1)
    return Node("memory", position) if position < k else Node("review")


def cycle_memory_epochs(review_epoch: int, delta: int, k: int) -> tuple[int, ...]:
    """The memory epochs (slot 0 first) whose snapshots the review at ``review_epoch`` uses."""
    return tuple(review_epoch - (k - slot) * delta for slot in range(k))


@dataclass(frozen=True)
class ScheduleSummary:
    """Which epochs are which node, for a whole run."""

    memory_epochs: tuple[tuple[int, ...], ...]  # per slot
    review_epochs: tuple[int, ...]
    general_epochs: tuple[int, ...]

    @property
    def counts(self) -> dict[str, int]:
        return {"memory": sum(map(len, self.memory_epochs)), "review": len(self.review_epochs),
                "general": len(self.general_epochs)}


def summarize_schedule(epochs: int, delta: int, k: int) -> ScheduleSummary:
    """Every epoch of the run sorted by node kind (memory epochs also by slot)."""
    nodes = [node_at(e, epochs, delta, k) for e in range(epochs)]
    return ScheduleSummary(
        memory_epochs=tuple(tuple(e for e, n in enumerate(nodes) if n.slot == s) for s in range(k)),
        review_epochs=tuple(e for e, n in enumerate(nodes) if n.kind == "review"),
        general_epochs=tuple(e for e, n in enumerate(nodes) if n.kind == "general"),
    )


def schedule_problem(epochs: int, delta: int, k: int, where: str = "methods.tskd", unit: str = "epoch"
                     ) -> str | None:
    """Why (epochs, delta, k) never reaches a review node, naming the params; None when it does.
    ``epochs`` counts ``unit``s (``"step"`` for a schedule in iterations)."""
    nodes = range(0, epochs, delta)
    if k < len(nodes):
        return None
    head = (f"{where}.k={k} exceeds the {len(nodes)} memory node(s) available before the first review"
            if k > len(nodes) else
            f"the schedule has no review {unit}: {where}.k={k} memory nodes fill all {len(nodes)} node(s)")
    shown = ", ".join(map(str, nodes[:6])) + (", ..." if len(nodes) > 6 else "")
    fixes = [f"{where}.k <= {len(nodes) - 1}"] if len(nodes) > 1 else []
    if (epochs - 1) // k >= 1:
        fixes.append(f"{where}.delta <= {(epochs - 1) // k}")
    fixes.append(f"at least {k * delta + 1} {unit}s")
    return (f"{head} ({epochs} {unit}s, {where}.delta={delta}: nodes at {unit}s {shown}); a review node comes "
            f"after k memory nodes, at {unit} k*delta. Allowed: {' or '.join(fixes)}")
