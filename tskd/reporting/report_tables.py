"""report.md's tables in the shape of the papers': pairs as columns, methods as rows.

One table per student recipe and figure kind (best, last): the teacher's row, the student trained
alone, then each method in the preset's order; each cell holds our mean ± std (n) over seeds, the
difference to KD's mean, and the published figure of the same kind with a numbered source.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from tskd.reporting.model_cost import NetworkCost
from tskd.reporting.reference_numbers import published
from tskd.spec.config import Preset
from tskd.tasks import task_of

KINDS = {"best": "the epoch of highest test {main} (mdistiller / TSKD authors' figure)",
         "last": "the final epoch (RepDistiller's figure)"}


def _cell(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f} (1)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({len(xs)})"


def _select(rows: list[dict[str, Any]], **key: str) -> list[dict[str, Any]]:
    return [r for r in rows if all(r[k] == v for k, v in key.items())]


class _Sources:
    """Numbered footnotes of the published figures' sources, in order of first use."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def mark(self, source: str) -> int:
        if source not in self.names:
            self.names.append(source)
        return self.names.index(source) + 1

    def lines(self) -> list[str]:
        return [f"{i}. {s}" for i, s in enumerate(self.names, 1)]


def _published_part(official: str | None, kind: str, sources: _Sources, pair: str, method: str) -> str:
    # Only a figure of the same kind is comparable: a published last-epoch figure goes in the last table.
    ref = published(official, pair, method) if official else None
    if ref is None or ref.figure != kind:
        return ""
    return f" · pub. {ref.value:.2f}<sup>{sources.mark(ref.source)}</sup>"


def paper_tables(p: Preset, rows: list[dict[str, Any]], official: str | None,
                 sizes: Mapping[str, NetworkCost] | None = None) -> list[str]:
    """The markdown lines of every recipe's best and last tables (``official``: the dataset whose
    published figures apply, None for synthetic or registered data). ``sizes``: each architecture's
    parameters and MACs (``tskd.reporting.model_cost``), the tables' header rows as in the papers."""
    task = task_of(p.dataset.name)
    main = task.labels[task.best]
    methods = ["vanilla", *(m for m in p.methods if m != "vanilla")]  # the student alone first
    names = {"vanilla": "student alone"}
    out: list[str] = []
    for recipe in p.student_recipes:
        for kind, what in KINDS.items():
            key, sources = f"{kind}_{task.best}", _Sources()
            out += [f"## Recipe `{recipe}`: {kind} test {main} (%)", "",
                    f"{kind.capitalize()}: {what.format(main=main)}. Each cell: mean ± std (n seeds)"
                    + ("; Δ: minus KD's mean" if "kd" in p.methods else "")
                    + ("; pub.: the published figure of the same kind, its source numbered below" if official
                       else "") + ".", "",
                    "| method | " + " | ".join(q.name for q in p.pairs) + " |", "|---|" + "---|" * len(p.pairs)]

            if sizes:
                for role in ("teacher", "student"):
                    cells = [f"{getattr(q, role)}: {sizes[getattr(q, role)].cell()}" if getattr(q, role) in sizes
                             else getattr(q, role) for q in p.pairs]
                    out.append(f"| {role} network | {' | '.join(cells)} |")
            cells = []
            for q in p.pairs:
                t = _select(rows, pair="teacher", student=q.teacher)
                pub = _published_part(official, kind, sources, q.name, "teacher")
                cells.append(_cell([r[key] for r in t]) + pub if t else "")
            out.append(f"| teacher | {' | '.join(cells)} |")
            for method in methods:
                cells = []
                for q in p.pairs:
                    sel = _select(rows, recipe=recipe, pair=q.name, method=method)
                    kd = _select(rows, recipe=recipe, pair=q.name, method="kd")
                    if not sel:
                        cells.append("")
                        continue
                    xs = [r[key] for r in sel]
                    delta = (f" · Δ {statistics.mean(xs) - statistics.mean(r[key] for r in kd):+.2f}"
                             if kd and method != "kd" else "")
                    cells.append(_cell(xs) + delta + _published_part(official, kind, sources, q.name, method))
                out.append(f"| {names.get(method, method)} | {' | '.join(cells)} |")
            out += ["", *sources.lines(), ""] if sources.names else [""]
    return out


def teacher_warnings(p: Preset, rows: list[dict[str, Any]]) -> list[str]:
    """One line per pair and recipe whose teacher is not clearly above its student trained alone
    (best figure, mean over seeds): below the student's mean, or within one seed std above it. Such a
    teacher has little to teach, and its pair's method differences mean little."""
    task = task_of(p.dataset.name)
    key, main = f"best_{task.best}", task.labels[task.best]
    out = []
    for q in p.pairs:
        teacher = _select(rows, pair="teacher", student=q.teacher)
        for recipe in p.student_recipes:
            alone = [r[key] for r in _select(rows, recipe=recipe, pair=q.name, method="vanilla")]
            if not (teacher and alone):
                continue
            t, s = statistics.mean(r[key] for r in teacher), statistics.mean(alone)
            spread = statistics.stdev(alone) if len(alone) > 1 else 0.0
            where = f"recipe `{recipe}`: {s:.2f}" + (f" ± {spread:.2f} over {len(alone)} seeds" if spread else "")
            if t < s:
                out.append(f"**Warning**: the teacher {q.teacher} (best {main} {t:.2f}) scores below its "
                           f"student {q.student} trained alone ({where}): on pair {q.name} there is nothing "
                           "to distil.")
            elif t - s <= spread:
                out.append(f"**Warning**: the teacher {q.teacher} (best {main} {t:.2f}) is not clearly above its "
                           f"student {q.student} trained alone ({where}; within one seed std): on pair {q.name} "
                           "there is little to distil, and method differences there mean little.")
    return out
