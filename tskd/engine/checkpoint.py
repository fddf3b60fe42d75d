"""Training checkpoints (resume state) and exported model files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tskd.io import atomic_torch_save

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state})


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or corrupt: torch raises several types
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(e).__name__}: {e}); it is truncated or corrupt. "
            "Delete it to train this run from the start.") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: not a tskd training checkpoint (version "
                              f"{state.get('version') if isinstance(state, dict) else '?'}, expected "
                              f"{CHECKPOINT_VERSION}). Delete it to train this run from the start.")
    return state


def export_model(path: Path, student: torch.nn.Module, *, arch: str, num_classes: int, epoch: int,
                 accuracy: float, method: str) -> None:
    """The deployed student in the CRD/mdistiller layout (weights under ``model``).

    Only the student's own weights: a method's training-only modules (connectors,
    ConvLSTMs, memory banks) are not part of the deployed network.
    """
    sd = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    atomic_torch_save(path, {"model": sd, "arch": arch, "num_classes": num_classes, "epoch": epoch,
                             "accuracy": accuracy, "method": method})
