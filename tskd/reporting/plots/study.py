"""The ablation study's plots (tskd.reporting.study): each variant's paired difference to the default TSKD,
the forecaster's predictability by review epoch, and what the variants cost ÷ KD as one param varies
(also drawn by benchmarks/bench_ablations.py from its own measurements)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from tskd.reporting.plots.curves import _seed_band
from tskd.reporting.plots.runs import Runs
from tskd.spec.config import Preset


def _panels(p: Preset) -> list[tuple[str, str]]:
    return [(recipe, q.name) for recipe in p.student_recipes for q in p.pairs]


def accuracy_figure(p: Preset, rows: list[dict[str, Any]]) -> Figure:
    """One panel per (recipe, pair): a bar per variant at its mean per-seed difference, with its 95 %
    confidence interval (none with a single paired seed)."""
    panels = _panels(p)
    fig = Figure(figsize=(7, 2.8 * len(panels)), layout="constrained")
    for ax, (recipe, pair) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        sel = [r for r in rows if (r["recipe"], r["pair"]) == (recipe, pair) and r["diff_mean"] is not None]
        ys = list(range(len(sel)))
        # asymmetric error bars: mean - low, high - mean (0 where there is no interval)
        err = [[r["diff_mean"] - r["diff_low"] if r["diff_low"] is not None else 0.0 for r in sel],
               [r["diff_high"] - r["diff_mean"] if r["diff_high"] is not None else 0.0 for r in sel]]
        ax.barh(ys, [r["diff_mean"] for r in sel], xerr=err, capsize=3,
                color=["tab:red" if r["diff_mean"] < 0 else "tab:green" for r in sel])
        ax.set_yticks(ys, [f"{r['variant']} (n={r['paired_n']})" for r in sel])
        ax.invert_yaxis()  # the preset's order from the top
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel("best top-1 − tskd's, same seed (points)")
        ax.set_title(f"{pair}, recipe {recipe}", fontsize=9)
    fig.suptitle(f"{p.preset}: variants vs default TSKD (mean and 95% CI over paired seeds)")
    return fig


def predictability_figure(p: Preset, runs: Runs) -> Figure:
    """Forecast MSE ÷ last-increment MSE by review epoch, one line per TSKD entry (band: min..max over seeds)."""
    panels = _panels(p)
    fig = Figure(figsize=(7, 3 * len(panels)), layout="constrained")
    for ax, (recipe, pair) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True):
        drawn = False
        for name in p.methods:
            sel = runs.students.get((recipe, pair, name), [])
            if any(r.get("train_predictability") is not None for m in sel for r in m["history"]):
                _seed_band(ax, sel, "train_predictability", name, marker="o", markersize=3)
                drawn = True
        if drawn:
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run of this preset logs train_predictability", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel("forecast MSE / last-increment MSE")
        ax.set_title(f"{pair}, recipe {recipe}", fontsize=9)
    fig.suptitle(f"{p.preset}: how well the forecast matches the target (< 1: better than the last increment)")
    return fig


@dataclass(frozen=True)
class CostPanel:
    param: str  # the x axis: the one param the curve's entries change ("k", "δ")
    ylabel: str  # what was divided by KD's
    curves: dict[str, list[tuple[float, float]]]  # a line's label -> its (param value, cost ÷ KD) points
    note: str  # shown when no curve has two points: why there is no curve to read


def cost_figure(title: str, panels: list[CostPanel]) -> Figure:
    """One panel per param, side by side: each curve's points joined in the order of the param, KD at 1."""
    fig = Figure(figsize=(4.5 * len(panels), 3.8), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for label, points in panel.curves.items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="KD")
        if max((len(pts) for pts in panel.curves.values()), default=0) < 2:
            ax.text(0.5, 0.5, panel.note, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
        values = sorted({x for points in panel.curves.values() for x, _ in points})
        if values:  # a tick at each value the preset runs (a lone point would get fractional ticks)
            ax.set_xticks(values)
        ax.set_xlabel(panel.param)
        ax.set_ylabel(panel.ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig
