"""The report's figures as PNG files under ``results/<preset>/plots/``, readable offline.

Their names follow from the preset alone (``plot_files``), so Snakemake and DVC declare them
before any run exists; ``write_plots`` draws them from the runs' metrics.json.
"""

from __future__ import annotations

from pathlib import Path

from tskd.engine.evolution import evolution_grids
from tskd.reporting.plots.runs import Runs, read_runs
from tskd.spec.config import Preset
from tskd.tasks import task_of


def _attention_applies(p: Preset) -> bool:
    # TSKD keeps one review step's attention maps on classification (tskd.distill.tskd.distiller).
    return "tskd" in p.methods and task_of(p.dataset.name).name == "classification"


def plot_files(p: Preset) -> dict[str, Path]:
    """Every plot of the preset: what it shows -> its file."""
    d, best = p.out / "plots", task_of(p.dataset.name).best
    out: dict[str, Path] = {}
    if any(t.checkpoint is None for t in p.teachers.values()):  # imported teachers have no curves
        out["teachers"] = d / f"teachers-test_{best}.png"
    for recipe in p.student_recipes:
        for q in p.pairs:
            out[f"{recipe}/{q.name}/test_{best}"] = d / f"{recipe}-{q.name}-test_{best}.png"
        for method in p.methods:
            out[f"{recipe}/{method}/losses"] = d / f"{recipe}-{method}-losses.png"
        if _attention_applies(p):
            out[f"{recipe}/tskd/review"] = d / f"{recipe}-tskd-review_loss.png"
            for q in p.pairs:
                out[f"{recipe}/{q.name}/tskd/attention"] = d / f"{recipe}-{q.name}-tskd-attention.png"
    for job, path in evolution_grids(p):  # one grid per run that follows fixed test images
        out[f"#evolution/{job.recipe}/{job.pair.name}/{job.method}/{job.seed}"] = path
    return out


def write_plots(p: Preset) -> list[Path]:
    """Draw every plot of ``plot_files`` (each written to a temporary name, then renamed)."""
    # lazy: matplotlib
    from tskd.reporting.plots.attention import attention_figure
    from tskd.reporting.plots.curves import losses_figure, main_figure, review_figure, save, teachers_figure
    from tskd.reporting.plots.evolution import evolution_figure

    runs = read_runs(p)
    task = task_of(p.dataset.name)
    files = plot_files(p)
    grids = {path: job for job, path in evolution_grids(p)}
    for key, path in files.items():
        parts = key.split("/")
        if path in grids:
            fig = evolution_figure(p, grids[path])
        elif key == "teachers":
            fig = teachers_figure(p, runs, task)
        elif parts[-1] == f"test_{task.best}":
            fig = main_figure(p, runs, task, parts[0], parts[1])
        elif parts[-1] == "losses":
            fig = losses_figure(p, runs, task, parts[0], parts[1])
        elif parts[-1] == "review":
            fig = review_figure(p, runs, parts[0])
        else:
            fig = attention_figure(p, runs, parts[0], parts[1])
        save(fig, path)
    return list(files.values())


__all__ = ["Runs", "plot_files", "read_runs", "write_plots"]
