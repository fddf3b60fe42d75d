"""A run's ``evolution.npz``: what a method recorded of a fixed set of test images through training
(TSKD: the student's attention maps at each memory node; see ``Distiller.watch``), and which runs
of a preset write one (so that Snakemake and DVC declare it before the run exists).

Arrays in the file: ``images`` (N, H, W, 3) uint8, the watched images as a person sees them;
``indices`` (N,) their positions in the test split; ``targets`` (N,) their labels and
``class_names`` (N,) their classes' names (files of earlier runs may lack both); ``epochs`` (M,)
the 1-based epoch of each record and ``labels`` (M,) its label (``M1``: memory slot 1); per map name (``tap0``...):
``maps/<name>`` (M, N, h, w) float16 and ``reference/<name>`` (N, h, w) float16 (the teacher's).

DVC's training stages declare the file among their outputs. Snakemake's do not: one rule trains
every method and a rule's outputs cannot vary with a wildcard's value (a second rule would need
its own SLURM settings in every profile). The job writes it before its metrics.json, which the
report rule does depend on, and a run that keeps none removes an earlier run's file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tskd.io import atomic_write_bytes
from tskd.spec.config import Preset
from tskd.spec.grid import StudentJob, effective_method_params, student_dir, student_jobs
from tskd.tasks import task_of

EVOLUTION_FILE = "evolution.npz"


def keeps_evolution(p: Preset, job: StudentJob) -> bool:
    """Whether a student run writes an evolution file: TSKD on a classification dataset with
    ``evolution_images`` > 0 (its default included)."""
    if p.registered(job.method) != "tskd" or task_of(p.dataset.name).name != "classification":
        return False
    params = effective_method_params("tskd", p.method_params(job.method, job.pair, job.recipe), p.dataset.name)
    return params["evolution_images"] > 0


def evolution_grids(p: Preset) -> list[tuple[StudentJob, Path]]:
    """Every run that keeps an evolution file, with the report's grid of it (tskd.reporting.plots.evolution)."""
    return [(job, p.out / "plots" / "evolution" / f"{job.recipe}-{job.pair.name}-{job.method}-seed{job.seed}.png")
            for job in student_jobs(p) if keeps_evolution(p, job)]


def evolution_files(p: Preset) -> list[Path]:
    """Every student run's evolution file, in the grid's order."""
    return [student_dir(p, job) / EVOLUTION_FILE for job in student_jobs(p) if keeps_evolution(p, job)]


def watched_indices(size: int, n: int) -> list[int]:
    """``n`` positions spread evenly over a split of ``size`` items: a split stored class by class
    (an ImageFolder's) then shows several classes, not the first class's first images."""
    n = min(n, size)
    return [i * size // n for i in range(n)]


def shown_images(images: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised (N, 3, H, W) tensors back to (N, H, W, 3) uint8."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float().cpu() * s + m).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_evolution(path: Path, images: np.ndarray, indices: list[int], reference: dict[str, torch.Tensor],
                    records: list[dict[str, Any]], targets: list[int] | None = None,
                    class_names: list[str] | None = None) -> None:
    """Write the file at ``path`` (a temporary name, then renamed)."""
    arrays: dict[str, np.ndarray] = {
        "images": images, "indices": np.asarray(indices, dtype=np.int64),
        "epochs": np.asarray([r["epoch"] for r in records], dtype=np.int64),
        "labels": np.asarray([r["label"] for r in records], dtype=str)}
    if targets is not None:
        arrays["targets"] = np.asarray(targets, dtype=np.int64)
    if class_names is not None:
        arrays["class_names"] = np.asarray(class_names, dtype=str)
    for name, ref in reference.items():
        arrays[f"reference/{name}"] = ref.numpy().astype(np.float16)
        shape = (0, *ref.shape)
        stacked = [r["maps"][name].numpy() for r in records]
        arrays[f"maps/{name}"] = (np.stack(stacked) if stacked else np.zeros(shape)).astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def read_evolution(path: Path) -> dict[str, Any]:
    """The file's arrays; ``names`` lists the map names in the file's order."""
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    out["names"] = [k.split("/", 1)[1] for k in out if k.startswith("reference/")]
    return out
