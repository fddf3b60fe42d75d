"""One TSKD run's feature-map evolution as an image grid (tskd.evolution): for each watched test
image and each branch's tap, a row of the student's attention maps at the memory nodes, oldest
first, then the teacher's map of the same image, the reference the student is pulled towards."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from tskd.config import Preset
from tskd.evolution import EVOLUTION_FILE, read_evolution
from tskd.grid import StudentJob, student_dir

MAX_COLUMNS = 12  # memory nodes shown; a long run's are thinned evenly, its first and last always kept


def shown_nodes(count: int, limit: int = MAX_COLUMNS) -> list[int]:
    """Which of ``count`` records get a column: all up to ``limit``, else ``limit`` spread evenly."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def _message(text: str) -> Figure:
    fig = Figure(figsize=(6, 2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def evolution_figure(p: Preset, job: StudentJob) -> Figure:
    path = student_dir(p, job) / EVOLUTION_FILE
    if not path.is_file():
        return _message(f"{path}: missing (written by the training job; rerun it to draw this grid)")
    return evolution_grid(read_evolution(path), f"{job.method} {job.pair.name}, recipe {job.recipe}, seed {job.seed}")


def evolution_grid(ev: dict, title: str) -> Figure:
    """The grid of one evolution file's arrays (``read_evolution``)."""
    nodes = shown_nodes(len(ev["epochs"]))
    if not nodes:
        return _message(f"{title}: no memory node was reached, so no maps were kept")
    names, images = ev["names"], ev["images"]
    rows = [(i, name) for i in range(len(images)) for name in names]
    cols = 1 + len(nodes) + 1  # the image, the nodes, the teacher
    fig = Figure(figsize=(max(1.15 * cols, 4.8), 1.2 * len(rows) + 0.7), layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (i, name) in enumerate(rows):
        maps = [ev[f"maps/{name}"][j, i].astype(np.float32) for j in nodes]
        teacher = ev[f"reference/{name}"][i].astype(np.float32)
        # One scale per row, from 0 (maps are non-negative): a row shows how one image's map changes.
        top = max(float(m.max()) for m in [*maps, teacher]) or 1.0
        if name == names[0]:  # the image once, beside its first tap's row
            axes[r, 0].imshow(images[i])
            axes[r, 0].set_title(f"test #{int(ev['indices'][i])}", fontsize=7)
        else:
            axes[r, 0].axis("off")
        for c, (j, m) in enumerate(zip(nodes, maps, strict=True), start=1):
            axes[r, c].imshow(m, cmap="magma", vmin=0.0, vmax=top)
            if r == 0:
                axes[r, c].set_title(f"ep {int(ev['epochs'][j])} {ev['labels'][j]}", fontsize=7)
        axes[r, -1].imshow(teacher, cmap="magma", vmin=0.0, vmax=top)
        if r == 0:
            axes[r, -1].set_title("teacher", fontsize=7)
        axes[r, 1].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    shown = "" if len(nodes) == len(ev["epochs"]) else f" ({len(nodes)} of {len(ev['epochs'])} nodes)"
    # Two short lines: a run with few nodes makes a narrow figure, which would clip one long line.
    fig.suptitle(f"{title}\nstudent's attention maps at its memory nodes{shown}", fontsize=8)
    return fig
