"""The k student snapshots a review node learns from, held in memory (docs/method.md).

The authors save whole model files at memory nodes and read all k back for every review
batch; copies of the weights in memory give the same numbers without that I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

Snapshot = dict[str, Tensor]


class SnapshotMemory(nn.Module):
    """k slots, each a snapshot of a model's parameters and buffers (detached copies).

    The slots travel in ``state_dict()`` (as the module's extra state) so that a run resumed
    from a checkpoint, also one taken just before a review epoch, reviews exactly the
    snapshots an uninterrupted run would. They follow ``.to()`` like buffers do.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self._slots: list[Snapshot | None] = [None] * k
        self._epochs: list[int | None] = [None] * k
        # Not saved: only marks the device that slots loaded from a (CPU) checkpoint belong on.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def store(self, slot: int, model: nn.Module, epoch: int) -> None:
        """Snapshot ``model`` into ``slot`` (taken at the end of memory epoch ``epoch``)."""
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        # clone(): the snapshot must not follow the model as it trains on.
        self._slots[slot] = {name: t.detach().clone() for name, t in tensors.items()}
        self._epochs[slot] = epoch

    @property
    def epochs(self) -> tuple[int | None, ...]:
        """The memory epoch each slot was taken at (None: empty)."""
        return tuple(self._epochs)

    def slot(self, i: int) -> Snapshot | None:
        """Snapshot held in slot ``i`` (None: empty)."""
        return self._slots[i]

    def snapshots(self) -> list[Snapshot]:
        """All k snapshots, slot 0 (the oldest of a cycle) first."""
        if any(s is None for s in self._slots):
            raise RuntimeError(f"TSKD review needs all {self.k} memory slots filled; filled at epochs {self.epochs}")
        return list(self._slots)  # type: ignore[arg-type]

    def get_extra_state(self) -> dict:
        return {"slots": list(self._slots), "epochs": list(self._epochs)}

    def set_extra_state(self, state: dict) -> None:
        if len(state["slots"]) != self.k:
            raise ValueError(f"checkpoint holds {len(state['slots'])} TSKD memory slots, this run has k={self.k}")
        device = self._anchor.device
        self._slots = [None if s is None else {n: t.to(device, copy=True) for n, t in s.items()}
                       for s in state["slots"]]
        self._epochs = list(state["epochs"])

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._slots = [None if s is None else {n: fn(t) for n, t in s.items()} for s in self._slots]
        return self
