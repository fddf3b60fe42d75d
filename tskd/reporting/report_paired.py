"""The report's answer to "is this method better than KD, or than the student alone, here?".

For each recipe, pair and method: the paired difference over seeds (``tskd.reporting.paired``) of the main
figure (best test top-1 on classification) against KD and against the student trained alone; per
method, its wins / ties / losses over the pairs; and the seed planner (how many seeds a pair needs to
detect 0.3 and 0.5 points at 80 % power, from the spread of the differences seen here). The same
numbers go to report.md, report.csv (columns on each run's row), the DVC summaries and the MLflow
parent runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tskd.reporting.paired import LEVEL, POWER, Difference, paired_difference, pooled_sd, seeds_cell, seeds_needed
from tskd.spec.config import Preset
from tskd.tasks import task_of

# The baselines every method is held against: the row's column prefix and its name in the text.
BASELINES = {"kd": "KD", "vanilla": "the student alone"}
PREFIX = {"kd": "vs_kd", "vanilla": "vs_student"}
PLANNED = (0.3, 0.5)  # the differences (points) the planner sizes a grid for
OUTCOMES = ("win", "tie", "loss", "untested")


@dataclass(frozen=True)
class Comparison:
    recipe: str
    pair: str
    method: str
    baseline: str  # "kd" or "vanilla"
    diff: Difference


def main_key(p: Preset) -> str:
    """The figure compared: the best epoch's main figure (the authors' figure)."""
    return f"best_{task_of(p.dataset.name).best}"


def _by_seed(rows: list[dict[str, Any]], key: str, recipe: str, pair: str, method: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows
            if (r["recipe"], r["pair"], r["method"]) == (recipe, pair, method) and r[key] != ""}


def comparisons(p: Preset, rows: list[dict[str, Any]]) -> list[Comparison]:
    """Every (recipe, pair, method, baseline) with runs on both sides; a method is not compared with
    itself, and the student alone is the baseline, never the compared."""
    key, out = main_key(p), []
    for recipe in p.student_recipes:
        for q in p.pairs:
            for base in BASELINES:
                b = _by_seed(rows, key, recipe, q.name, base)
                if not b or base not in p.methods:
                    continue
                for m in p.methods:
                    if m in (base, "vanilla"):
                        continue
                    a = _by_seed(rows, key, recipe, q.name, m)
                    if a:
                        out.append(Comparison(recipe, q.name, m, base, paired_difference(a, b)))
    return out


def record(cs: list[Comparison], method: str, baseline: str, recipe: str) -> dict[str, int]:
    """Wins / ties / losses (and untested: fewer than two paired seeds) of one method over the pairs."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for c in cs:
        if (c.method, c.baseline, c.recipe) == (method, baseline, recipe):
            counts[c.diff.outcome] += 1
    return counts


def _planner(cs: list[Comparison], method: str, baseline: str, recipe: str) -> tuple[float | None, int, list]:
    sd, df = pooled_sd(c.diff for c in cs if (c.method, c.baseline, c.recipe) == (method, baseline, recipe))
    return sd, df, [seeds_needed(sd, d) for d in PLANNED]


def run_columns(p: Preset) -> list[str]:
    """The columns report.csv gains: each run's row carries its group's comparison (the same on every
    seed of the group, so one seed's rows are the comparison table)."""
    key = main_key(p)
    return [f"{PREFIX[b]}_{key}_{part}" for b in BASELINES for part in ("diff", "low", "high", "p", "n")]


def add_run_columns(p: Preset, rows: list[dict[str, Any]], cs: list[Comparison]) -> None:
    key = main_key(p)
    by = {(c.recipe, c.pair, c.method, c.baseline): c.diff for c in cs}
    for r in rows:
        for b in BASELINES:
            d = by.get((r["recipe"], r["pair"], r["method"], b))
            values = d.as_dict() if d else {}
            for part in ("diff", "low", "high", "p", "n"):
                v = values.get(part)
                r[f"{PREFIX[b]}_{key}_{part}"] = "" if v is None else v


def summary_entries(cs: list[Comparison]) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> recipe -> {pair: {vs_kd: {...}, vs_student: {...}}, record_vs_kd: {...}, ...}, merged
    into the DVC summary files (``dvc metrics show`` flattens the keys)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for c in cs:
        entry = out.setdefault(c.method, {}).setdefault(c.recipe, {})
        entry.setdefault(c.pair, {})[PREFIX[c.baseline]] = c.diff.as_dict()
        entry[f"record_{PREFIX[c.baseline]}"] = record(cs, c.method, c.baseline, c.recipe)
    return out


def parent_metrics(cs: list[Comparison]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(recipe, pair, method) -> the MLflow metrics of that group's parent run."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for c in cs:
        m = out.setdefault((c.recipe, c.pair, c.method), {})
        for part, v in c.diff.as_dict().items():
            if v is not None:
                m[f"{PREFIX[c.baseline]}_{part}"] = float(v)
    return out


def recipe_differences(p: Preset, recipe: str, method: str, baseline: str) -> dict[str, tuple[Any, Any]]:
    """The recipe values a method trains with that its baseline does not (``by_method``): such runs
    still share the seed's student initialisation and image order (the order is drawn from (seed,
    epoch) whatever the batch size), but not the schedule."""
    a, b = (p.recipe_for(recipe, m).model_dump() for m in (method, baseline))
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _pairing_notes(p: Preset, cs: list[Comparison]) -> list[str]:
    out = []
    for recipe, m, b in dict.fromkeys((c.recipe, c.method, c.baseline) for c in cs):
        diff = recipe_differences(p, recipe, m, b)
        if diff:
            values = ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items())
            out.append(f"- Recipe `{recipe}`: {m} and {BASELINES[b]} train with different recipe values ({values}): "
                       "a seed gives both the same student initialisation and image order, not the same schedule; "
                       "the difference is that of the whole recipe, not of the method alone.")
    return ["Where the pairing is partial:", "", *out, ""] if out else []


def paired_tables(p: Preset, rows: list[dict[str, Any]], cs: list[Comparison]) -> list[str]:
    """report.md's section: per recipe, the differences with their intervals, the record per method,
    and the seed planner."""
    if not cs:
        return []
    task = task_of(p.dataset.name)
    main = f"best {task.labels[task.best]}"
    level = f"{LEVEL:.0%}"
    bases = [b for b in BASELINES if any(c.baseline == b for c in cs)]
    out = ["## Paired differences: is a method better here than seed noise?", "",
           f"Seed s gives every method of a pair the same student initialisation and data order, so runs pair "
           f"by seed. Each cell: the mean over seeds of (method − baseline) in {main} (points), in the same "
           f"seed, and its {level} confidence interval (Student's t on the per-seed differences, n − 1 degrees "
           f"of freedom); p: the two-sided paired t-test. **Bold**: the interval excludes 0. n: the paired "
           f"seeds; with one seed there is no interval.", "", *_pairing_notes(p, cs)]
    for recipe in p.student_recipes:
        sel = [c for c in cs if c.recipe == recipe]
        if not sel:
            continue
        out += [f"### Recipe `{recipe}`", "",
                "| pair | method | n | " + " | ".join(f"Δ vs {BASELINES[b]} [{level} CI] | p" for b in bases) + " |",
                "|---|---|---|" + "---|---|" * len(bases)]
        for q in p.pairs:
            for m in p.methods:
                by = {c.baseline: c.diff for c in sel if (c.pair, c.method) == (q.name, m)}
                if not by:
                    continue
                n = max(d.n for d in by.values())
                cells = [f"{by[b].cell()} | {by[b].p_cell()}" if b in by else " | " for b in bases]
                out.append(f"| {q.name} | {m} | {n} | " + " | ".join(cells) + " |")
        out += ["", f"Wins / ties / losses over the pairs (a tie: the {level} interval holds 0; untested: "
                "fewer than two paired seeds):", "",
                "| method | " + " | ".join(f"vs {BASELINES[b]}" for b in bases) + " |",
                "|---|" + "---|" * len(bases)]
        for m in dict.fromkeys(c.method for c in sel):
            cells = []
            for b in bases:
                r = record(sel, m, b, recipe)
                cells.append(f"{r['win']} / {r['tie']} / {r['loss']}" + (f" ({r['untested']} untested)"
                                                                          if r["untested"] else ""))
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out += ["", "Seed planner: the seeds a pair needs for the paired t-test to detect a true difference of "
                + " and ".join(f"{d} points" for d in PLANNED) + f" with {POWER:.0%} power (two-sided, "
                f"{1 - LEVEL:.2g} level), from the spread of the per-seed differences seen here, pooled over the "
                "pairs (its degrees of freedom: df). An estimate from few seeds is itself rough; rerun the "
                "report as seeds arrive.", "",
                "| method | vs | paired std | df | " + " | ".join(f"seeds for {d}" for d in PLANNED) + " |",
                "|---|---|---|---|" + "---|" * len(PLANNED)]
        for m in dict.fromkeys(c.method for c in sel):
            for b in bases:
                if not any((c.method, c.baseline) == (m, b) for c in sel):
                    continue
                sd, df, needed = _planner(sel, m, b, recipe)
                out.append(f"| {m} | {BASELINES[b]} | {'' if sd is None else f'{sd:.2f}'} | {df} | "
                           + " | ".join(seeds_cell(n) for n in needed) + " |")
        out.append("")
    return out
