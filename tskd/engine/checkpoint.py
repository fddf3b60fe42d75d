"""Training checkpoints (resume state) and exported model files.

The latest checkpoint is ``checkpoint.pt``; the one before it is kept as ``checkpoint.prev.pt``
until the next is in place, so a checkpoint damaged on disk (a node that died mid-write on a
filesystem without atomic rename) costs one epoch, not the run: the loader falls back to the
previous one with a warning.

A disk (or quota) that fills while a checkpoint or model file is written raises ``DiskFullError``
(``tskd.io.atomic_write``): the temporary file is removed and the files already there are left
as they were, so the last complete checkpoint survives and a rerun, once there is space, resumes
from it. Writing a checkpoint needs room for a third copy while it is written (the new one beside
``checkpoint.pt`` and ``checkpoint.prev.pt``); an exported model needs its own size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from tskd.errors import TskdError
from tskd.io import atomic_torch_save

CHECKPOINT_VERSION = 1
log = logging.getLogger(__name__)


class CheckpointError(TskdError, ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def previous_path(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path``; the checkpoint it replaces becomes ``previous_path(path)``."""
    atomic_torch_save(path, {"version": CHECKPOINT_VERSION, **state}, keep_previous=previous_path(path))


def remove_checkpoints(path: Path) -> None:
    """Delete the checkpoint, its predecessor and any half-written temporary file."""
    for p in (path, previous_path(path), *_temporaries(path)):
        p.unlink(missing_ok=True)


def _temporaries(path: Path) -> list[Path]:
    # atomic_write's temporaries: ".checkpoint.pt.<random>.tmp".
    return sorted(path.parent.glob(f".{path.name}.*")) if path.parent.is_dir() else []


def load_latest_checkpoint(path: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint at ``path`` (or its predecessor), None when there is none.

    Orphaned temporary files of an interrupted write are removed first. A damaged latest file
    with a readable predecessor gives the predecessor and a warning; with none, CheckpointError.
    """
    for tmp in _temporaries(path):
        log.warning("%s: removing the temporary file of an interrupted checkpoint write", tmp)
        tmp.unlink(missing_ok=True)
    prev = previous_path(path)
    if not path.exists():
        if not prev.exists():
            return None
        log.warning("%s is missing (killed while replacing it); resuming from %s", path, prev)
        return load_checkpoint(prev)
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        if not prev.exists():
            raise
        state = load_checkpoint(prev)
        log.warning("%s; falling back to the previous checkpoint %s (epoch %s)", e, prev, state.get("epoch"))
        return state


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
                 accuracy: float, method: str, input_spec: dict[str, Any] | None = None) -> None:
    """The deployed student in the CRD/mdistiller layout (weights under ``model``).

    Only the student's own weights: a method's training-only modules (connectors,
    ConvLSTMs, memory banks) are not part of the deployed network. ``input_spec`` records what
    the network was trained on (``normalization`` name, ``mean``, ``std``, ``image_size``), so
    that a run distilling from it can tell whether it feeds the teacher what it was trained with.
    """
    sd = {k: v.detach().cpu() for k, v in student.state_dict().items()}
    atomic_torch_save(path, {"model": sd, "arch": arch, "num_classes": num_classes, "epoch": epoch,
                             "accuracy": accuracy, "method": method, "input": input_spec})
