"""Curves by epoch: the task's main test figure per pair (methods overlaid, a band over seeds),
the train losses by term, TSKD's review loss at its review epochs, the teachers' curves."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tskd.io import atomic_write_bytes
from tskd.reporting.plots.runs import Runs
from tskd.spec.config import Preset
from tskd.tasks import Task


def save(fig: Figure, path: Path) -> Path:
    # No software/date metadata: the same runs give the same bytes (a DVC output's hash).
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


def _column(history: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the rows that have ``key`` (None: not measured that epoch)."""
    pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    return np.array([e for e, _ in pts], dtype=float), np.array([v for _, v in pts], dtype=float)


def _seed_band(ax, runs: list[dict[str, Any]], key: str, label: str, **style) -> None:
    """The mean over seeds as a line, min..max over seeds as a shaded band."""
    curves = [_column(m["history"], key) for m in runs]
    curves = [(e, v) for e, v in curves if len(e)]
    if not curves:
        return
    n = min(len(e) for e, _ in curves)
    epochs, values = curves[0][0][:n], np.stack([v[:n] for _, v in curves])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are whole numbers, from 1
    (line,) = ax.plot(epochs, values.mean(0), label=f"{label} (n={len(curves)})", **style)
    if len(curves) > 1:
        ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)


def _methods(p: Preset) -> list[str]:
    return ["vanilla", *(m for m in p.methods if m != "vanilla")]


# A marker and a dash per method, in the preset's order: two methods whose curves coincide (TSKD and
# KD in a short run) stay both visible, as do the lines on a grey-scale print.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
DASHES = ("-", "--", "-.", ":")


def method_style(i: int) -> dict[str, Any]:
    return {"marker": MARKERS[i % len(MARKERS)], "linestyle": DASHES[i % len(DASHES)], "markersize": 4,
            "markerfacecolor": "none" if i % 2 else None}


def _outside_legend(ax) -> None:
    """The legend right of the axes, so it covers no line (the teacher's is often near the top)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def main_figure(p: Preset, runs: Runs, task: Task, recipe: str, pair: str) -> Figure:
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.add_subplot()
    key, label = f"test_{task.best}", task.labels[task.best]
    for i, method in enumerate(_methods(p)):
        if (recipe, pair, method) in runs.students:
            name = "student alone" if method == "vanilla" else method
            _seed_band(ax, runs.students[(recipe, pair, method)], key, name, **method_style(i))
    teacher = next(q.teacher for q in p.pairs if q.name == pair)
    best = runs.teachers[teacher].get(f"best_{task.best}")
    if isinstance(best, (int, float)):
        ax.axhline(best, color="black", linestyle="--", linewidth=1, label=f"teacher {teacher} (best {best:.2f})")
    ax.set(title=f"{pair}, recipe {recipe}: test {label} by epoch", xlabel="epoch", ylabel=f"test {label} (%)")
    _outside_legend(ax)
    ax.grid(alpha=0.3)
    return fig


# TSKD's monitors (Distiller.take_monitors, docs/method.md "Ablations"): measured, never part of the loss.
MONITORS = ("forecast_mse", "last_increment_mse", "predictability")


def loss_terms(runs: list[dict[str, Any]], task: Task) -> list[str]:
    """The history's train loss columns: each term, then their sum (``train_loss``)."""
    keys = dict.fromkeys(k for m in runs for r in m["history"] for k in r)
    terms = [k for k in keys if k.startswith("train_") and k != "train_loss"
             and k.removeprefix("train_") not in (*task.figures, "top1", *MONITORS)]
    return [*terms, "train_loss"]


def losses_figure(p: Preset, runs: Runs, task: Task, recipe: str, method: str) -> Figure:
    pairs = [q.name for q in p.pairs if (recipe, q.name, method) in runs.students]
    if method == "vanilla":  # one run per student arch, under each of its pairs: drawn once
        pairs = list({tuple(map(id, runs.students[(recipe, q, method)])): q for q in pairs}.values())
    every = [m for q in pairs for m in runs.students[(recipe, q, method)]]
    terms = loss_terms(every, task)
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig = Figure(figsize=(4 * cols, 3.2 * rows), layout="constrained")
    # The student alone has no pair: its curves are named by the student's architecture.
    names = {q.name: (f"{q.student} alone" if method == "vanilla" else q.name) for q in p.pairs}
    for i, term in enumerate(terms):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, q in enumerate(pairs):
            _seed_band(ax, runs.students[(recipe, q, method)], term, names[q], **method_style(j))
        ax.set(title=term.removeprefix("train_") if term != "train_loss" else "total", xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{method}, recipe {recipe}: train loss by term (mean over the epoch)")
    return fig


def review_figure(p: Preset, runs: Runs, recipe: str) -> Figure:
    """TSKD's review loss: measured at review epochs only, drawn as points per seed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for q in p.pairs:
        for m in runs.students.get((recipe, q.name, "tskd"), []):
            e, v = _column(m["history"], "train_review")
            ax.plot(e, v, marker="o", linestyle=":", label=f"{q.name} seed {m['seed']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # review epochs; one review is one point
    ax.set(title=f"TSKD, recipe {recipe}: review loss at review epochs", xlabel="epoch",
           ylabel="review loss (ConvLSTM forecast vs |S - T|)")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def teachers_figure(p: Preset, runs: Runs, task: Task) -> Figure:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    key, label = f"test_{task.best}", task.labels[task.best]
    for arch, m in runs.teachers.items():
        if m.get("history"):
            _seed_band(ax, [m], key, f"{arch} (seed {m['seed']})", marker="o", markersize=3)
    ax.set(title=f"teachers: test {label} by epoch", xlabel="epoch", ylabel=f"test {label} (%)")
    if ax.lines:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
