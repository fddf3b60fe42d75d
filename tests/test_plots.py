"""The report's plots, checked on the drawn figure: what a reader must be able to tell apart, and
nothing drawn over something else."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_report import _tskd_preset, _write_tskd_runs
from tskd.reporting.plots import read_runs
from tskd.tasks import task_of


@pytest.fixture
def drawn(tmp_path: Path):
    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, 60.0)
    return p, read_runs(p), task_of(p.dataset.name)


def _box(artist):
    return artist.get_window_extent(artist.figure.canvas.get_renderer())


def _draw(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig


def test_methods_are_told_apart_and_the_legend_covers_no_line(drawn):
    from tskd.reporting.plots.curves import main_figure

    p, runs, task = drawn
    fig = main_figure(p, runs, task, "student", "resnet20-resnet8")
    _draw(fig)
    ax = fig.axes[0]
    methods = [ln for ln in ax.lines if "(n=" in ln.get_label()]
    assert len(methods) == 3
    # a line hidden under another (KD under TSKD when they coincide) still shows its own marks
    assert len({(ln.get_marker(), ln.get_linestyle()) for ln in methods}) == 3
    legend, axes = _box(ax.get_legend()), _box(ax)
    assert legend.x0 >= axes.x1, "the legend sits on the data"
    assert legend.x1 <= fig.bbox.x1, "the legend is cut off"


def test_the_student_alone_is_named_by_its_network_not_a_pair(drawn):
    from tskd.reporting.plots.curves import losses_figure

    p, runs, task = drawn
    fig = losses_figure(p, runs, task, "student", "vanilla")
    labels = {ln.get_label() for ax in fig.axes for ln in ax.lines}
    assert labels == {"resnet8 alone (n=2)"}


def test_colour_bar_labels_stay_clear_of_the_next_panel(drawn):
    from tskd.reporting.plots.attention import attention_figure

    p, runs, _ = drawn
    # Scales as a real review step has them: increments of a few thousandths, a forecast of either
    # sign, a target of whole units (the longer the tick labels, the wider the bars).
    small = [[0.0005 * (i - j) + 0.0031 for j in range(8)] for i in range(8)]
    signed = [[0.0123 * (i - j) for j in range(8)] for i in range(8)]
    big = [[1.7 * (i + j) for j in range(8)] for i in range(8)]
    for m in runs.students[("student", "resnet20-resnet8", "tskd")]:
        m["capture"] |= {"frames": [small, small], "forecast": signed, "target": big}
    fig = attention_figure(p, runs, "student", "resnet20-resnet8")
    _draw(fig)
    renderer = fig.canvas.get_renderer()
    panels = [ax for ax in fig.axes if ax.images]  # the image panels; the colour bars have none
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(panels) == len(bars) == 4
    panels.sort(key=lambda a: _box(a).x0)
    bars.sort(key=lambda a: _box(a).x0)
    for bar, nxt in zip(bars, panels[1:], strict=False):
        right = max(t.get_window_extent(renderer).x1 for t in bar.get_yticklabels() if t.get_text())
        assert right < _box(nxt).x0, "a colour bar's labels run into the next panel"


def test_a_single_review_epoch_is_a_point_on_an_integer_epoch(drawn):
    from tskd.reporting.plots.curves import review_figure

    p, runs, _ = drawn
    fig = review_figure(p, runs, "student")
    _draw(fig)
    ax = fig.axes[0]
    assert all(len(ln.get_xdata()) == 1 and ln.get_marker() == "o" for ln in ax.lines)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [3.0]
