"""The ablation study's table: each TSKD variant against the default TSKD, paired over seeds.

A preset that lists ``tskd`` and variants of it (``methods.<name>.method: tskd``) gets, beside its
report, ``study.md`` and ``study.csv`` (one row per recipe, pair and method entry, in the preset's
order) and two plots. Seeds are paired: a variant's run with seed s is compared with ``tskd``'s run
with seed s (the same data order and initialisation), so the spread of the differences excludes the
seed-to-seed variation that both share. Only seeds present for both count in the paired columns.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from tskd.config import Preset
from tskd.io import atomic_write_text
from tskd.plots.runs import Runs, read_runs
from tskd.tasks import task_of

BASELINE = "tskd"  # the default TSKD: the entry every variant is compared with
PREDICTABILITY = "train_predictability"  # forecast MSE / last-increment MSE, per review epoch

COLUMNS = ["recipe", "pair", "variant", "method", "n", "best_mean", "best_std", "paired_n", "diff_mean", "diff_std",
           "predictability"]


def study_applies(p: Preset) -> bool:
    """A study needs the default TSKD and at least one variant of it (classification: TSKD's review)."""
    return (BASELINE in p.methods and p.registered(BASELINE) == BASELINE
            and any(p.registered(n) == BASELINE for n in p.methods if n != BASELINE)
            and task_of(p.dataset.name).name == "classification")


def study_files(p: Preset) -> list[Path]:
    """The study's outputs (none when it does not apply): declared by the report rule and stage."""
    if not study_applies(p):
        return []
    return [p.out / "study.md", p.out / "study.csv", p.out / "plots" / "study-accuracy.png",
            p.out / "plots" / "study-predictability.png"]


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _predictability(runs: list[dict[str, Any]]) -> float | None:
    """Mean over every seed's review epochs; None when no history has the column."""
    xs = [r[PREDICTABILITY] for m in runs for r in m["history"] if r.get(PREDICTABILITY) is not None]
    return statistics.fmean(xs) if xs else None


def study_rows(p: Preset, runs: Runs) -> list[dict[str, Any]]:
    key = f"best_{task_of(p.dataset.name).best}"
    rows = []
    for recipe in p.student_recipes:
        for q in p.pairs:
            base = {m["seed"]: m[key] for m in runs.students.get((recipe, q.name, BASELINE), [])}
            for name in p.methods:
                if name == "vanilla":
                    continue
                sel = runs.students.get((recipe, q.name, name), [])
                best = [m[key] for m in sel]
                diffs = [m[key] - base[m["seed"]] for m in sel if m["seed"] in base] if name != BASELINE else []
                rows.append({"recipe": recipe, "pair": q.name, "variant": name, "method": p.registered(name),
                             "n": len(best), "best_mean": statistics.fmean(best) if best else None,
                             "best_std": _std(best), "paired_n": len(diffs),
                             "diff_mean": statistics.fmean(diffs) if diffs else None, "diff_std": _std(diffs),
                             "predictability": _predictability(sel)})
    return rows


def _f(x: float | None, digits: int = 2, sign: bool = False) -> str:
    return "" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_study(p: Preset, rows: list[dict[str, Any]]) -> str:
    label = task_of(p.dataset.name).labels[task_of(p.dataset.name).best]
    out = [f"# Ablation study: {p.preset}", "",
           f"Best test {label} (%) per variant, mean ± std (n seeds); Δ vs tskd: the mean ± std of the per-seed "
           "differences (variant − tskd, same seed; n pairs); predictability: the mean over review epochs of the "
           "forecast's MSE ÷ the last-increment predictor's (< 1: the forecaster beats the parameter-free guess; "
           "blank where the runs do not log it).", ""]
    for recipe in p.student_recipes:
        for q in p.pairs:
            out += [f"## Recipe `{recipe}`, pair {q.name}", "",
                    f"| variant | method | best {label} | Δ vs tskd | predictability |", "|---|---|---|---|---|"]
            for r in (r for r in rows if (r["recipe"], r["pair"]) == (recipe, q.name)):
                acc = "" if r["best_mean"] is None else (
                    f"{_f(r['best_mean'])}" + (f" ± {_f(r['best_std'])}" if r["best_std"] is not None else "")
                    + f" ({r['n']})")
                diff = "" if r["diff_mean"] is None else (
                    _f(r["diff_mean"], sign=True) + (f" ± {_f(r['diff_std'])}" if r["diff_std"] is not None else "")
                    + f" ({r['paired_n']})")
                if r["variant"] == BASELINE:
                    diff = "(reference)"
                out.append(f"| {r['variant']} | {r['method']} | {acc} | {diff} | {_f(r['predictability'], 3)} |")
            out.append("")
    out += ["Plots: plots/study-accuracy.png (Δ vs tskd per variant, mean and ± std over seeds), "
            "plots/study-predictability.png (predictability by review epoch per variant).", ""]
    return "\n".join(out)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def write_study(p: Preset) -> list[Path]:
    """Write study.md, study.csv and the study's plots (each to a temporary name, then renamed)."""
    from tskd.plots.curves import save
    from tskd.plots.study import accuracy_figure, predictability_figure

    files = study_files(p)
    if not files:
        return []
    runs = read_runs(p)
    rows = study_rows(p, runs)
    md, csv_path, acc_png, pred_png = files
    save(accuracy_figure(p, rows), acc_png)
    save(predictability_figure(p, runs), pred_png)
    atomic_write_text(csv_path, _csv(rows))
    atomic_write_text(md, format_study(p, rows))
    return files
