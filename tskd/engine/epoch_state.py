"""What a training epoch accumulates, and the random state it runs in: saved mid-epoch, so that a
run killed inside an epoch (an ImageNet epoch outlasts many SLURM time limits) resumes at the step
it reached and ends with the numbers of an uninterrupted run (bit for bit on CPU).

The rest of a mid-epoch resume lives elsewhere: the epoch's data order is re-drawn from its seed and
the batches already trained are skipped without being read (``RunData.train_loader(start=...)``);
each image's augmentation is drawn from (epoch seed, image index), whatever process reads it
(``tskd.data.splits.IndexedSplit``); the model, optimizer and method state are the checkpoint's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tskd.engine import distributed
from tskd.engine.runtime import epoch_seed


class EpochTotals:
    """Sample-weighted sums of the loss terms and the task's training figures, kept on the device
    (reading them per step would make the host wait for the GPU)."""

    def __init__(self, meter, device: torch.device):
        self.meter = meter
        self.device = device
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.base: list[float] = []  # the meter's totals before a resume

    def add(self, losses: dict[str, torch.Tensor], loss: torch.Tensor, b: int, outputs: Any, targets: Any) -> None:
        self.n += b
        self.meter.update(outputs, targets)
        for k, v in (*losses.items(), ("loss", loss)):
            term = v.detach().double() * b
            self.sums[k] = self.sums[k] + term if k in self.sums else term

    def state(self, step: int) -> dict[str, Any]:
        """The checkpoint's ``partial``: how far the epoch got and what it has summed so far."""
        return {"step": step, "n": self.n, "sums": {k: float(v) for k, v in self.sums.items()},
                "meter": self._meter_totals(), "rng": rng_state(self.device)}

    def load(self, partial: dict[str, Any]) -> None:
        self.n = partial["n"]
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in partial["sums"].items()}
        self.base = list(partial["meter"])

    def _meter_totals(self) -> list[float]:
        now = self.meter.totals()
        return [a + b for a, b in zip(now, self.base, strict=True)] if self.base else now

    def result(self, world: distributed.World) -> tuple[int, list[float], dict[str, float]]:
        """(samples, the meter's totals, the loss sums) of the whole epoch, over every rank."""
        kept = self._meter_totals()
        keys = sorted(self.sums)
        values: Sequence[float] = [self.n, *kept, *(float(self.sums[k]) for k in keys)]
        if world.distributed:  # identical on every rank
            values = distributed.sum_values(values, self.device)
        n, rest = int(values[0]), list(values[1:])
        return n, rest[:len(kept)], dict(zip(keys, rest[len(kept):], strict=True))


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], seed: int, epoch: int, step: int, rank: int) -> None:
    """Rank 0 continues the saved random streams. The other ranks' streams were not saved (only rank
    0 writes checkpoints): they are re-seeded from (seed, epoch, step, rank), reproducibly."""
    if rank != 0:
        s = epoch_seed(epoch_seed(epoch_seed(seed, epoch), step), rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
