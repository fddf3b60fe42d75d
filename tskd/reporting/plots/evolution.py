"""One TSKD run's feature-map evolution as an image grid (tskd.engine.evolution): for each watched test
image and each branch's tap, a row of the student's attention maps at the memory nodes, oldest
first, then the teacher's map of the same image, the reference the student is pulled towards."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from tskd.engine.evolution import EVOLUTION_FILE, read_evolution
from tskd.spec.config import Preset
from tskd.spec.grid import StudentJob, student_dir

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


def _image_title(ev: dict, i: int) -> str:
    """``test #7 apple``: the image's place in the test split and its class (an ImageNet class's first
    name, cut to fit a cell); the place alone in a file that has no class names."""
    title = f"test #{int(ev['indices'][i])}"
    if "class_names" in ev:
        name = str(ev["class_names"][i]).split(",")[0].strip()
        title += f"\n{name[:19] + '…' if len(name) > 20 else name}"
    return title


CELL = 32  # pixels per cell of the mosaic; maps are upsampled to it (nearest: a map's own cells stay visible)
GAP = 3  # white pixels between cells


def _cell(a: np.ndarray) -> np.ndarray:
    """An (h, w, 3) float image in [0, 1] resampled, nearest, to CELL x CELL."""
    rows = (np.arange(CELL) * a.shape[0]) // CELL
    cols = (np.arange(CELL) * a.shape[1]) // CELL
    return a[rows][:, cols]


def evolution_grid(ev: dict, title: str) -> Figure:
    """The grid of one evolution file's arrays (``read_evolution``).

    Drawn as one mosaic image on one axes, not an axes per cell: a full-length run's grid has 14
    columns by (images x taps) rows, and a grid's hundred-odd axes cost a second each to build and lay
    out, which made ``tskd report`` on the cifar100 grid spend most of its time here."""
    from matplotlib import colormaps

    nodes = shown_nodes(len(ev["epochs"]))
    if not nodes:
        return _message(f"{title}: no memory node was reached, so no maps were kept")
    names, images = ev["names"], ev["images"]
    rows = [(i, name) for i in range(len(images)) for name in names]
    cols = 1 + len(nodes) + 1  # the image, the nodes, the teacher
    magma = colormaps["magma"]
    step = CELL + GAP
    mosaic = np.ones((len(rows) * step - GAP, cols * step - GAP, 3), dtype=np.float32)

    def put(r: int, c: int, rgb: np.ndarray) -> None:
        mosaic[r * step:r * step + CELL, c * step:c * step + CELL] = _cell(rgb)

    for r, (i, name) in enumerate(rows):
        maps = [ev[f"maps/{name}"][j, i].astype(np.float32) for j in nodes]
        teacher = ev[f"reference/{name}"][i].astype(np.float32)
        # One scale per row, from 0 (maps are non-negative): a row shows how one image's map changes.
        top = max(float(m.max()) for m in [*maps, teacher]) or 1.0
        if name == names[0]:  # the image once, beside its first tap's row
            put(r, 0, np.asarray(images[i], dtype=np.float32) / 255.0)
        for c, m in enumerate([*maps, teacher], start=1):
            put(r, c, magma(np.clip(m / top, 0.0, 1.0))[..., :3])

    fig = Figure(figsize=(max(1.15 * cols, 4.8) + 0.6, 1.2 * len(rows) + 0.9))
    ax = fig.add_axes((0.6 / fig.get_figwidth(), 0.02, 1 - 0.7 / fig.get_figwidth(),
                       1 - 0.02 - 0.9 / fig.get_figheight()))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    centre = lambda k: k * step + CELL / 2  # noqa: E731 - a cell's centre, in mosaic pixels
    heads = [f"ep {int(ev['epochs'][j])} {ev['labels'][j]}" for j in nodes] + ["teacher"]
    for c, head in enumerate(heads, start=1):
        ax.text(centre(c), -2, head, ha="center", va="bottom", fontsize=7)
    for r, (i, name) in enumerate(rows):
        if name == names[0]:
            ax.text(centre(0), r * step - 2, _image_title(ev, i), ha="center", va="bottom", fontsize=7)
        ax.text(-3, centre(r), name, ha="right", va="center", fontsize=7)
    shown = "" if len(nodes) == len(ev["epochs"]) else f" ({len(nodes)} of {len(ev['epochs'])} nodes)"
    # Two short lines: a run with few nodes makes a narrow figure, which would clip one long line.
    fig.suptitle(f"{title}\nstudent's attention maps at its memory nodes{shown}", fontsize=8)
    return fig
