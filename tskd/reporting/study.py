"""The ablation study's table: each TSKD variant against the default TSKD, paired over seeds.

A preset that lists ``tskd`` and variants of it (``methods.<name>.method: tskd``) gets, beside its
report, ``study.md`` and ``study.csv`` (one row per recipe, pair and method entry, in the preset's
order) and three plots. Seeds are paired: a variant's run with seed s is compared with ``tskd``'s run
with seed s (the same data order and initialisation), so the spread of the differences excludes the
seed-to-seed variation that both share. Only seeds present for both count in the paired columns.
The differences carry the report's paired statistics (``tskd.reporting.paired``): the mean, its 95 %
confidence interval and the paired t-test's p-value, against ``tskd`` and against ``kd``.

Each row also has its cost ÷ KD, from the runs' own wall-clock ``seconds`` per epoch: its review
epochs against KD's same epochs, and its whole run. Those runs shared the machine with whatever
else ran; ``benchmarks/bench_ablations.py`` is the controlled measurement.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from tskd.engine.evolution import evolution_grids
from tskd.io import atomic_write_text
from tskd.reporting.paired import Difference, paired_difference
from tskd.reporting.plots.runs import Runs, read_runs
from tskd.spec.config import PairCfg, Preset
from tskd.spec.grid import effective_method_params
from tskd.tasks import task_of

BASELINE = "tskd"  # the default TSKD: the entry every variant is compared with
KD = "kd"  # the unit of the cost columns
PREDICTABILITY = "train_predictability"  # forecast MSE / last-increment MSE, per review epoch
REVIEW = "train_review"  # TSKD's review loss: not None exactly in its review epochs

COLUMNS = ["recipe", "pair", "variant", "method", "n", "best_mean", "best_std", "paired_n", "diff_mean", "diff_std",
           "diff_low", "diff_high", "diff_p", "kd_paired_n", "kd_diff_mean", "kd_diff_low", "kd_diff_high", "kd_diff_p",
           "predictability", "review_epoch_ratio", "run_ratio"]


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
            p.out / "plots" / "study-predictability.png", p.out / "plots" / "study-cost.png"]


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _predictability(runs: list[dict[str, Any]]) -> float | None:
    """Mean over every seed's review epochs; None when no history has the column."""
    xs = [r[PREDICTABILITY] for m in runs for r in m["history"] if r.get(PREDICTABILITY) is not None]
    return statistics.fmean(xs) if xs else None


def review_epoch_ratio(runs: list[dict[str, Any]], kd: list[dict[str, Any]]) -> float | None:
    """Mean seconds of the runs' review epochs ÷ KD's mean at the same epoch numbers (over every seed
    of each). The same epochs, not KD's average: epoch 1 carries start-up costs (loaders, a compile)
    that would otherwise weigh on one side only. None without review epochs or KD runs."""
    review = [(r["epoch"], r["seconds"]) for m in runs for r in m["history"] if r.get(REVIEW) is not None]
    epochs = {e for e, _ in review}
    same = [r["seconds"] for m in kd for r in m["history"] if r["epoch"] in epochs]
    if not review or not same:
        return None
    return statistics.fmean(s for _, s in review) / statistics.fmean(same)


def run_ratio(runs: list[dict[str, Any]], kd: list[dict[str, Any]]) -> float | None:
    """Mean over seeds of a run's total seconds ÷ KD's mean total; None without runs of either."""
    if not runs or not kd:
        return None
    total = [sum(r["seconds"] for r in m["history"]) for m in runs]
    return statistics.fmean(total) / statistics.fmean(sum(r["seconds"] for r in m["history"]) for m in kd)


def _paired_columns(d: Difference | None, prefix: str) -> dict[str, Any]:
    d = d or Difference(0, None, None, None, None, None)
    return {f"{prefix}paired_n": d.n, f"{prefix}diff_mean": d.mean, f"{prefix}diff_low": d.low,
            f"{prefix}diff_high": d.high, f"{prefix}diff_p": d.p}


def study_rows(p: Preset, runs: Runs) -> list[dict[str, Any]]:
    key = f"best_{task_of(p.dataset.name).best}"
    rows = []
    for recipe in p.student_recipes:
        for q in p.pairs:
            base = {m["seed"]: m[key] for m in runs.students.get((recipe, q.name, BASELINE), [])}
            kd = runs.students.get((recipe, q.name, KD), []) if KD in p.methods else []
            kd_best = {m["seed"]: m[key] for m in kd}
            for name in p.methods:
                if name == "vanilla":
                    continue
                sel = runs.students.get((recipe, q.name, name), [])
                best = [m[key] for m in sel]
                mine = {m["seed"]: m[key] for m in sel}
                vs_base = paired_difference(mine, base) if name != BASELINE else None
                vs_kd = paired_difference(mine, kd_best) if name != KD and kd_best else None
                rows.append({"recipe": recipe, "pair": q.name, "variant": name, "method": p.registered(name),
                             "n": len(best), "best_mean": statistics.fmean(best) if best else None,
                             "best_std": _std(best), **_paired_columns(vs_base, ""),
                             "diff_std": vs_base.sd if vs_base else None, **_paired_columns(vs_kd, "kd_"),
                             "predictability": _predictability(sel),
                             "review_epoch_ratio": review_epoch_ratio(sel, kd), "run_ratio": run_ratio(sel, kd)})
    return rows


def varied_only_in(params: dict[str, dict[str, Any]], key: str, base: str = BASELINE) -> list[str]:
    """The entries whose effective params equal ``base``'s but for ``key`` (``base`` among them), by
    their value of ``key``: the points of a curve that changes that param alone."""
    rest = {k: v for k, v in params[base].items() if k != key}
    names = [n for n, v in params.items() if {k: x for k, x in v.items() if k != key} == rest]
    return sorted(names, key=lambda n: params[n][key])


def tskd_params(p: Preset, recipe: str, pair: PairCfg) -> dict[str, dict[str, Any]]:
    """Every TSKD entry's effective params for one (recipe, pair): defaults, overrides and all."""
    return {n: effective_method_params(BASELINE, p.method_params(n, pair, recipe), p.dataset.name)
            for n in p.methods if p.registered(n) == BASELINE}


def cost_panels(p: Preset, rows: list[dict[str, Any]]) -> list[Any]:
    """The cost figure's panels: review-epoch time ÷ KD against k, whole-run time ÷ KD against δ, one
    curve per (recipe, pair) through the entries that change that param alone."""
    from tskd.reporting.plots.study import CostPanel  # lazy: matplotlib

    axes = {"k": ("k", "review epoch time ÷ KD's", "review_epoch_ratio"),
            "delta": ("δ", "whole-run time ÷ KD's", "run_ratio")}
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {key: {} for key in axes}
    entries = dict.fromkeys(axes, 0)  # the most entries that change the param alone, in any (recipe, pair)
    for recipe in p.student_recipes:
        for q in p.pairs:
            params = tskd_params(p, recipe, q)
            by = {r["variant"]: r for r in rows if (r["recipe"], r["pair"]) == (recipe, q.name)}
            for key, (_, _, column) in axes.items():
                names = varied_only_in(params, key)
                entries[key] = max(entries[key], len(names))
                curves[key][f"{q.name}, recipe {recipe}"] = [
                    (params[n][key], by[n][column]) for n in names if by[n][column] is not None]
    return [CostPanel(param, ylabel, curves[key],
                      f"the preset varies only {param} from {BASELINE} in fewer than two entries" if entries[key] < 2
                      else f"fewer than two of the entries that vary only {param} have a time ÷ KD")
            for key, (param, ylabel, _) in axes.items()]


def _f(x: float | None, digits: int = 2, sign: bool = False) -> str:
    return "" if x is None else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _diff_cell(r: dict[str, Any], prefix: str) -> str:
    """The paired difference as the report shows it: mean [95 % CI] (n), bold where the interval
    excludes 0; blank without paired seeds."""
    d = Difference(r[f"{prefix}paired_n"], r[f"{prefix}diff_mean"], None, r[f"{prefix}diff_low"],
                   r[f"{prefix}diff_high"], r[f"{prefix}diff_p"])
    if d.mean is None:
        return " | "
    return f"{d.cell()} ({d.n}) | {d.p_cell()}"


def format_study(p: Preset, rows: list[dict[str, Any]]) -> str:
    label = task_of(p.dataset.name).labels[task_of(p.dataset.name).best]
    out = [f"# Ablation study: {p.preset}", "",
           f"Best test {label} (%) per variant, mean ± std (n seeds). Δ vs tskd and Δ vs kd: the mean of the "
           "per-seed differences (variant − tskd or − kd, same seed), its 95% confidence interval (Student's t on "
           "the per-seed differences) and n paired seeds, **bold** where the interval excludes 0; p: the two-sided "
           "paired t-test (the report's statistics). Predictability: the mean over review epochs of the "
           "forecast's MSE ÷ the last-increment predictor's (< 1: the forecaster beats the parameter-free guess; "
           "blank where the runs do not log it). Review epoch ÷ kd: the mean seconds of the entry's review epochs ÷ "
           "kd's mean at the same epochs; run ÷ kd: the mean over seeds of a run's total seconds ÷ kd's (both blank "
           "without a kd entry, the first also without review epochs). These are the wall-clock times of the runs "
           "themselves, which shared the machine with whatever else ran then; benchmarks/bench_ablations.py is the "
           "controlled measurement.", ""]
    for recipe in p.student_recipes:
        for q in p.pairs:
            out += [f"## Recipe `{recipe}`, pair {q.name}", "",
                    f"| variant | method | best {label} | Δ vs tskd [95% CI] | p | Δ vs kd [95% CI] | p | "
                    "predictability | review epoch ÷ kd | run ÷ kd |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for r in (r for r in rows if (r["recipe"], r["pair"]) == (recipe, q.name)):
                acc = "" if r["best_mean"] is None else (
                    f"{_f(r['best_mean'])}" + (f" ± {_f(r['best_std'])}" if r["best_std"] is not None else "")
                    + f" ({r['n']})")
                diff = "(reference) | " if r["variant"] == BASELINE else _diff_cell(r, "")
                kd = "(reference) | " if r["variant"] == KD else _diff_cell(r, "kd_")
                out.append(f"| {r['variant']} | {r['method']} | {acc} | {diff} | {kd} | "
                           f"{_f(r['predictability'], 3)} | {_f(r['review_epoch_ratio'])} | {_f(r['run_ratio'])} |")
            out.append("")
    out += ["Plots: plots/study-accuracy.png (Δ vs tskd per variant: the mean and its 95% interval over paired seeds), "
            "plots/study-predictability.png (predictability by review epoch per variant), plots/study-cost.png "
            "(review epoch ÷ kd against k, run ÷ kd against δ, through the entries that change that param alone).", ""]
    out += _evolution_links(p)
    return "\n".join(out)


def _evolution_links(p: Preset) -> list[str]:
    """Each entry's feature-map evolution grids (tskd.reporting.plots.evolution), one link per seed."""
    grids: dict[tuple[str, str, str], list[str]] = {}
    for job, path in evolution_grids(p):
        grids.setdefault((job.recipe, job.pair.name, job.method), []).append(
            f"[seed {job.seed}](plots/evolution/{path.name})")
    if not grids:
        return []
    return ["Feature-map evolution, the student's attention maps of fixed test images at each memory node "
            "(one grid per run):", "", *(f"- {name} ({pair}, recipe {recipe}): {', '.join(links)}"
                                         for (recipe, pair, name), links in grids.items()), ""]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def write_study(p: Preset) -> list[Path]:
    """Write study.md, study.csv and the study's plots (each to a temporary name, then renamed)."""
    from tskd.reporting.plots.curves import save  # lazy: matplotlib
    from tskd.reporting.plots.study import accuracy_figure, cost_figure, predictability_figure  # lazy: matplotlib

    files = study_files(p)
    if not files:
        return []
    runs = read_runs(p)
    rows = study_rows(p, runs)
    md, csv_path, acc_png, pred_png, cost_png = files
    save(accuracy_figure(p, rows), acc_png)
    save(predictability_figure(p, runs), pred_png)
    save(cost_figure(f"{p.preset}: what each TSKD entry's runs took ÷ KD's (wall clock)", cost_panels(p, rows)),
         cost_png)
    atomic_write_text(csv_path, _csv(rows))
    atomic_write_text(md, format_study(p, rows))
    return files
