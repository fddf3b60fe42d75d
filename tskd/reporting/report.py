"""The results table of a preset: report.csv (one row per run) and report.md (mean ± std).

Its figures are the task's (``tskd.tasks``): classification reports top-1 and top-5 and picks
the best epoch on top-1; another task brings its own columns.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tskd.errors import TskdError
from tskd.io import atomic_write_text
from tskd.reporting.model_cost import NetworkCost, network_cost
from tskd.reporting.plots import write_plots
from tskd.reporting.reference_numbers import published
from tskd.reporting.report_html import markdown_html
from tskd.reporting.report_paired import add_run_columns, comparisons, paired_tables, run_columns, summary_entries
from tskd.reporting.report_tables import paper_tables, teacher_warnings
from tskd.reporting.study import write_study
from tskd.spec.config import Preset
from tskd.spec.grid import student_dir, student_jobs, teacher_dir
from tskd.tasks import Task, task_of


class ReportError(TskdError):
    """A result file the report needs is missing or unreadable."""


RUN_COLUMNS = ["recipe", "pair", "teacher", "student", "method", "seed"]
COST = "device_seconds"  # the run's epochs' wall seconds × its devices (GPUs, or CPU threads)


def figure_columns(task: Task) -> list[str]:
    """A row's result columns: the best epoch's figures and which epoch, the last epoch's, the
    validation-selected epoch's main figure (empty without a validation split) and the separate
    evaluation of the exported model (students)."""
    return [*(f"best_{f}" for f in task.figures), "best_epoch", *(f"last_{f}" for f in task.figures),
            f"selected_{task.best}", "selected_epoch", f"eval_{task.best}"]


def averaged(task: Task) -> dict[str, str]:
    """The figures of a row that are averaged over seeds, with their table headings, in table order
    (best and last of the main figure first)."""
    order = [(w, task.best) for w in ("best", "last")]
    order += [(w, f) for f in task.figures if f != task.best for w in ("best", "last")]
    out = {f"{w}_{f}": f"{w} {task.labels[f]}" for w, f in order}
    return out | {f"selected_{task.best}": f"selected {task.labels[task.best]}"}


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: cannot read results ({e}); rerun the stage that writes it") from None


def _figures(m: dict[str, Any], task: Task) -> dict[str, Any]:
    return {k: m.get(k, "") for k in figure_columns(task)[:-1]}


def collect_rows(p: Preset) -> list[dict[str, Any]]:
    task = task_of(p.dataset.name)
    rows = []
    for arch, t in p.teachers.items():
        m = _read(teacher_dir(p, arch) / "metrics.json")
        rows.append({"recipe": t.recipe, "pair": "teacher", "teacher": "", "student": arch, "method": m["method"],
                     "seed": m["seed"], **_figures(m, task), f"eval_{task.best}": "",
                     "device_seconds": m.get("device_seconds", "")})
    for job in student_jobs(p):
        d = student_dir(p, job)
        m, e = _read(d / "metrics.json"), _read(d / "eval.json")
        # The student alone runs once per student arch; it is listed under every pair that has it.
        pairs = [q for q in p.pairs if q.student == job.pair.student] if job.method == "vanilla" else [job.pair]
        for q in pairs:
            rows.append({"recipe": job.recipe, "pair": q.name, "teacher": q.teacher, "student": q.student,
                         "method": job.method, "seed": job.seed, **_figures(m, task),
                         f"eval_{task.best}": e[task.best], "device_seconds": m.get("device_seconds", "")})
    return rows


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _present(rows: list[dict[str, Any]], key: str) -> bool:
    return any(r[key] != "" for r in rows)


def _published_cell(dataset: str | None, pair: str, method: str) -> str:
    ref = published(dataset, pair, method) if dataset else None
    return f"{ref.value:.2f} ({ref.figure}; {ref.source})" if ref else ""


def format_markdown(p: Preset, rows: list[dict[str, Any]], dataset: str | None = None,
                    plots: Sequence[Path] = (), sizes: Mapping[str, NetworkCost] | None = None) -> str:
    # Published figures are comparable only on the official data (not synthetic or registered data).
    official = dataset if dataset in ("cifar100", "imagenet", "coco") else None
    task = task_of(p.dataset.name)
    names = [task.labels[f] for f in task.figures]
    main, shown = task.labels[task.best], (", ".join(names[:-1]) + " and " + names[-1]) if len(names) > 1 else names[0]
    out = [f"# Results: preset `{p.preset}`" + (f", dataset `{dataset}`" if dataset else ""), "",
           f"{task.title}. **best**: the epoch of highest test {main} (mdistiller / TSKD authors' figure), "
           f"its {shown}; **last**: the final epoch (RepDistiller's figure); **selected**: the epoch of "
           f"highest validation {main} (with a validation split). Each cell is the mean ± sample std over n seeds."
           + (" **published**: the figure a paper or code base reports, which figure it is, and its source."
              if official else ""), ""]
    if p.dataset.synthetic is not None:
        out[2:2] = ["**Synthetic data** (tskd-written, a few images per class, a few epochs): these numbers test the "
                    "pipeline's plumbing and say nothing about how the methods compare.", ""]
    warnings = teacher_warnings(p, rows)
    out += [*(w for line in warnings for w in (line, "")), *paper_tables(p, rows, official, sizes),
            *paired_tables(p, rows, comparisons(p, rows)), *cost_lines(p, rows)]
    grids = [f for f in plots if f.parent.name == "evolution"]  # one per run: linked, not shown inline
    if plots:
        out += ["## Plots", "", "PNG files beside this report, in `plots/` (readable offline).", "",
                *(f"![{f.stem}](plots/{f.name})" for f in plots if f not in grids), ""]
    if grids:
        out += ["### Feature-map evolution", "", "Per TSKD run: the student's attention maps of fixed test images at "
                "each memory node, then the teacher's (docs/method.md, \"Feature-map evolution\").", "",
                *(f"- [{f.stem}](plots/evolution/{f.name})" for f in grids), ""]
    out += ["# Every figure, by run kind", ""]
    pub = " published |" if official else ""
    teachers = [r for r in rows if r["pair"] == "teacher"]
    if teachers:
        out += ["## Teachers", "", f"| teacher | source | recipe | seed | best {main} | last {main} |" + pub,
                "|---|---|---|---|---|---|" + ("---|" if official else "")]
        for r in teachers:
            pairs = [q.name for q in p.pairs if q.teacher == r["student"]]
            cell = next((c for c in (_published_cell(official, q, "teacher") for q in pairs) if c), "")
            out.append(f"| {r['student']} | {r['method']} | {r['recipe']} | {r['seed']} | "
                       f"{r[f'best_{task.best}']:.2f} | {r[f'last_{task.best}']:.2f} |"
                       + (f" {cell} |" if official else ""))
        out.append("")
    students = [r for r in rows if r["pair"] != "teacher"]
    headings = averaged(task)
    figures = [k for k in headings if _present(students, k)]
    for recipe in p.student_recipes:
        out += [f"## Students, recipe `{recipe}`", "",
                "| pair | method | n | " + " | ".join(headings[k] for k in figures) + " |" + pub,
                "|---|---|---|" + "---|" * (len(figures) + bool(official))]
        for pair in p.pairs:
            for method in p.methods:
                sel = [r for r in students if (r["recipe"], r["pair"], r["method"]) == (recipe, pair.name, method)]
                if sel:
                    cells = [_mean_std([r[k] for r in sel]) for k in figures]
                    if official:
                        cells.append(_published_cell(official, pair.name, method))
                    out.append(f"| {pair.name} | {method} | {len(sel)} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: the student alone is listed under every pair of its student, trained once."""
    seen, out = set(), []
    for r in rows:
        key = (r["recipe"], r["pair"] if r["method"] != "vanilla" or r["pair"] == "teacher" else "",
               r["student"], r["method"], r["seed"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def cost_lines(p: Preset, rows: list[dict[str, Any]]) -> list[str]:
    """What the results cost, per method and in all: device-hours (GPU-hours on GPUs, core-hours on
    CPU: the epochs' wall time × the run's devices). Runs from a tskd that did not record it count
    as unknown."""
    runs = _runs(rows)
    if not any(r.get(COST) not in ("", None) for r in runs):
        return []
    out = ["## What the results cost", "",
           "Device-hours: each run's epochs (training and test) in wall time × its devices, summed over the "
           "runs: GPU-hours on GPUs, core-hours on CPU (its threads). Start-up and evaluation jobs are not counted.",
           "", "| runs of | runs | device-hours | per run (hours) |", "|---|---|---|---|"]
    groups = {"teachers": [r for r in runs if r["pair"] == "teacher"]}
    groups |= {m: [r for r in runs if r["pair"] != "teacher" and r["method"] == m] for m in p.methods}
    total, known = 0.0, 0
    for name, sel in groups.items():
        hours = [float(r[COST]) / 3600 for r in sel if r.get(COST) not in ("", None)]
        if not sel:
            continue
        unknown = len(sel) - len(hours)
        total += sum(hours)
        known += len(hours)
        per = f"{statistics.fmean(hours):.3f}" if hours else ""
        out.append(f"| {name} | {len(sel)}" + (f" ({unknown} unrecorded)" if unknown else "")
                   + f" | {sum(hours):.3f} | {per} |")
    out += [f"| **all** | {len(runs)} | **{total:.3f}** | |", ""]
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}


def summaries(p: Preset, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The table's figures as numbers, one mapping per file: ``teachers`` and one per method.

    ``dvc metrics show`` prints one row per file, so methods become rows and recipe/pair columns,
    as in the paper's tables.
    """
    best, last = (f"{w}_{task_of(p.dataset.name).best}" for w in ("best", "last"))
    out: dict[str, dict[str, Any]] = {"teachers": {}}
    for r in rows:
        if r["pair"] == "teacher":
            out["teachers"][r["student"]] = {"best": r[best], "last": r[last]}
    for method in p.methods:
        out[method] = {}
        for recipe in p.student_recipes:
            for pair in p.pairs:
                sel = [r for r in rows if (r["recipe"], r["pair"], r["method"]) == (recipe, pair.name, method)]
                if sel:
                    b, la = _stats([r[best] for r in sel]), _stats([r[last] for r in sel])
                    out[method].setdefault(recipe, {})[pair.name] = {
                        "best": b["mean"], "best_std": b["std"], "last": la["mean"], "last_std": la["std"],
                        "n": len(sel)}
    # The paired comparisons against KD and the student alone, beside each pair's figures.
    for method, recipes in summary_entries(comparisons(p, rows)).items():
        for recipe, entries in recipes.items():
            mine = out[method].setdefault(recipe, {})
            for name, entry in entries.items():
                mine[name] = mine.get(name, {}) | entry
    return out


def summary_files(p: Preset) -> list[Path]:
    return [p.out / "summary" / f"{name}.json" for name in ("teachers", *p.methods)]


def write_report(p: Preset) -> Path:
    """Write report.csv, report.md, report.html (report.md on one self-contained page: what
    ``snakemake --report`` and MLflow show), summary/<name>.json and plots/*.png under
    results/<preset>/; returns report.md."""
    rows = collect_rows(p)
    add_run_columns(p, rows, comparisons(p, rows))
    names = {_read(teacher_dir(p, arch) / "metrics.json").get("dataset") for arch in p.teachers} - {None}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUN_COLUMNS + figure_columns(task_of(p.dataset.name)) + [COST] + run_columns(p),
                       lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(p.out / "report.csv", buf.getvalue())
    for name, figures in summaries(p, rows).items():
        atomic_write_text(p.out / "summary" / f"{name}.json", json.dumps(figures, indent=1, sort_keys=True) + "\n")
    plots = write_plots(p)
    write_study(p)  # a preset with TSKD variants: study.md, study.csv and their plots
    md = format_markdown(p, rows, ", ".join(sorted(names)) or None, plots, network_sizes(p))
    atomic_write_text(p.out / "report.html", markdown_html(md, p.out))
    return atomic_write_text(p.out / "report.md", md)


def network_sizes(p: Preset) -> dict[str, NetworkCost]:
    """Each teacher's and student's parameters and MACs, from a model file of it in the results."""
    files = {arch: teacher_dir(p, arch) / "model.pt" for arch in p.teachers}
    for job in student_jobs(p):
        files.setdefault(job.pair.student, student_dir(p, job) / "model.pt")
    return {arch: network_cost(f) for arch, f in files.items() if f.is_file()}
