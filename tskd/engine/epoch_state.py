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
    """Sample-weighted sums of the loss terms, of the method's monitors (``Distiller.take_monitors``)
    and of the task's training figures, kept on the device (reading them per step would make the host
    wait for the GPU)."""

    def __init__(self, meter, device: torch.device):
        self.meter = meter
        self.device = device
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        # Apart from the loss terms: never part of the loss, and a monitor may be measured in some steps
        # only, so each keeps the samples it was measured on, its mean's denominator.
        self.monitors: dict[str, torch.Tensor] = {}
        self.monitor_n: dict[str, int] = {}
        self.base: list[float] = []  # the meter's totals before a resume

    def add(self, losses: dict[str, torch.Tensor], loss: torch.Tensor, b: int, outputs: Any, targets: Any,
            monitors: dict[str, torch.Tensor] | None = None) -> None:
        self.n += b
        self.meter.update(outputs, targets)
        for k, v in (*losses.items(), ("loss", loss)):
            term = v.detach().double() * b
            self.sums[k] = self.sums[k] + term if k in self.sums else term
        for k, v in (monitors or {}).items():
            term = v.detach().double() * b
            self.monitors[k] = self.monitors[k] + term if k in self.monitors else term
            self.monitor_n[k] = self.monitor_n.get(k, 0) + b

    def state(self, step: int) -> dict[str, Any]:
        """The checkpoint's ``partial``: how far the epoch got and what it has summed so far."""
        return {"step": step, "n": self.n, "sums": {k: float(v) for k, v in self.sums.items()},
                "meter": self._meter_totals(), "rng": rng_state(self.device),
                "monitors": {k: [float(v), self.monitor_n[k]] for k, v in self.monitors.items()}}

    def load(self, partial: dict[str, Any]) -> None:
        self.n = partial["n"]
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in partial["sums"].items()}
        self.base = list(partial["meter"])
        monitors = partial.get("monitors", {})  # absent in checkpoints written before monitors existed
        self.monitors = {k: torch.tensor(s, dtype=torch.float64, device=self.device) for k, (s, _) in monitors.items()}
        self.monitor_n = {k: n for k, (_, n) in monitors.items()}

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

    def monitor_means(self, world: distributed.World) -> dict[str, float]:
        """Each monitor's mean over the samples of the steps that measured it, over every rank."""
        keys = sorted(self.monitors)
        if not keys:
            return {}  # every rank runs the same steps, so all of them skip the collective alike
        values: Sequence[float] = [*(float(self.monitors[k]) for k in keys), *(self.monitor_n[k] for k in keys)]
        if world.distributed:
            values = distributed.sum_values(values, self.device)
        return {k: values[i] / max(values[len(keys) + i], 1) for i, k in enumerate(keys)}


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
