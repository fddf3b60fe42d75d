"""TSKD at work: one review step's attention increments as images, for one branch (the first tap).

The k frames are how the student's attention map changed between its memory snapshots and up to
now (``|M1-M2|, ..., |S-Mk|``); the ConvLSTM forecasts the next one, which the review loss pulls
towards the target ``|S - T|``, the current student-teacher gap (docs/method.md).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tskd.reporting.plots.runs import Runs
from tskd.spec.config import Preset


def attention_figure(p: Preset, runs: Runs, recipe: str, pair: str) -> Figure:
    seeds = runs.students.get((recipe, pair, "tskd"), [])
    seed, cap = next(((m["seed"], m["capture"]) for m in seeds if m.get("capture")), (None, None))
    if cap is None:
        fig = Figure(figsize=(6, 2))
        fig.text(0.5, 0.5, f"{pair}, recipe {recipe}: no TSKD run kept a review step's attention maps "
                 "(no review epoch?)", ha="center", va="center", wrap=True)
        return fig
    k = len(cap["frames"])
    panels = [*(f"|M{i + 1} - M{i + 2}|" for i in range(k - 1)), f"|S - M{k}|", "forecast", "target |S - T|"]
    images = [np.array(x) for x in (*cap["frames"], cap["forecast"], cap["target"])]
    fig = Figure(figsize=(2.9 * len(images), 3.0), layout="constrained")
    # Room between panels for each colour bar's tick labels (they ran into the next panel).
    fig.get_layout_engine().set(wspace=0.08)
    axes = fig.subplots(1, len(images))
    for ax, title, image in zip(axes, panels, images, strict=True):
        # A colour scale per panel: right after a snapshot |S - Mk| and an untrained forecast are orders
        # of magnitude below |S - T| and would be black on a shared one; each title gives its range (a forecast
        # may be negative).
        low, high = float(image.min()), float(image.max())
        shown = ax.imshow(image, cmap="magma", vmin=min(low, 0.0), vmax=high if high > min(low, 0.0) else 1.0)
        ax.set_title(f"{title}\n{low:.3g} .. {high:.3g}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(shown, ax=ax, shrink=0.7)
        bar.ax.yaxis.set_major_locator(MaxNLocator(4))
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(f"TSKD {pair}, recipe {recipe}, seed {seed}: review epoch {cap['epoch']}, tap {cap['tap']}, "
                 "first image of the first review step")
    return fig
