"""The results table of a preset: report.csv (one row per run) and report.md (mean ± std)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from tskd.config import Preset
from tskd.grid import student_dir, student_jobs, teacher_dir
from tskd.io import atomic_write_text

COLUMNS = ["pair", "teacher", "student", "method", "seed", "best_top1", "best_epoch", "last_top1",
           "last_top5", "eval_top1"]


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read results ({e}); rerun the stage that writes it") from None


def collect_rows(p: Preset) -> list[dict[str, Any]]:
    rows = []
    for arch in p.teachers:
        m = _read(teacher_dir(p, arch) / "metrics.json")
        rows.append({"pair": "teacher", "teacher": "", "student": arch, "method": m["method"],
                     "seed": m["seed"], "best_top1": m["best_top1"], "best_epoch": m["best_epoch"],
                     "last_top1": m["last_top1"], "last_top5": m["last_top5"], "eval_top1": ""})
    for method, pair, seed in student_jobs(p):
        d = student_dir(p, method, pair, seed)
        m, e = _read(d / "metrics.json"), _read(d / "eval.json")
        # The student alone runs once per student arch; it is listed under every pair that has it.
        pairs = [q for q in p.pairs if q.student == pair.student] if method == "vanilla" else [pair]
        for q in pairs:
            rows.append({"pair": q.name, "teacher": q.teacher, "student": q.student, "method": method,
                         "seed": seed, "best_top1": m["best_top1"], "best_epoch": m["best_epoch"],
                         "last_top1": m["last_top1"], "last_top5": m["last_top5"], "eval_top1": e["top1"]})
    return rows


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def format_markdown(p: Preset, rows: list[dict[str, Any]]) -> str:
    out = [f"# Results: preset `{p.preset}`", "",
           "Top-1 accuracy (%) on the test set. **best**: best epoch (mdistiller / TSKD authors' figure); "
           "**last**: final epoch (RepDistiller's figure); mean ± sample std over seeds, n = number of seeds.",
           ""]
    teachers = [r for r in rows if r["pair"] == "teacher"]
    if teachers:
        out += ["## Teachers", "", "| teacher | source | seed | best | last |", "|---|---|---|---|---|"]
        out += [f"| {r['student']} | {r['method']} | {r['seed']} | {r['best_top1']:.2f} | {r['last_top1']:.2f} |"
                for r in teachers]
        out.append("")
    out += ["## Students", "", "| pair | method | n | best top-1 | last top-1 | last top-5 |",
            "|---|---|---|---|---|---|"]
    for pair in p.pairs:
        for method in p.methods:
            sel = [r for r in rows if r["pair"] == pair.name and r["method"] == method]
            if not sel:
                continue
            out.append(f"| {pair.name} | {method} | {len(sel)} | {_mean_std([r['best_top1'] for r in sel])} | "
                       f"{_mean_std([r['last_top1'] for r in sel])} | {_mean_std([r['last_top5'] for r in sel])} |")
    return "\n".join(out) + "\n"


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(xs), 4), "std": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0}


def summaries(p: Preset, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The table's figures as numbers, one mapping per file: ``teachers`` and one per method.

    ``dvc metrics show`` prints one row per file, so methods become rows and pairs columns, as in
    the paper's tables.
    """
    out: dict[str, dict[str, Any]] = {"teachers": {}}
    for r in rows:
        if r["pair"] == "teacher":
            out["teachers"][r["student"]] = {"best": r["best_top1"], "last": r["last_top1"]}
    for method in p.methods:
        out[method] = {}
        for pair in p.pairs:
            sel = [r for r in rows if r["pair"] == pair.name and r["method"] == method]
            if sel:
                best, last = _stats([r["best_top1"] for r in sel]), _stats([r["last_top1"] for r in sel])
                out[method][pair.name] = {"best": best["mean"], "best_std": best["std"], "last": last["mean"],
                                          "n": len(sel)}
    return out


def summary_files(p: Preset) -> list[Path]:
    return [p.out / "summary" / f"{name}.json" for name in ("teachers", *p.methods)]


def write_report(p: Preset) -> Path:
    """Write report.csv, report.md and summary/<name>.json under results/<preset>/; returns report.md."""
    rows = collect_rows(p)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(p.out / "report.csv", buf.getvalue())
    for name, figures in summaries(p, rows).items():
        atomic_write_text(p.out / "summary" / f"{name}.json", json.dumps(figures, indent=1, sort_keys=True) + "\n")
    return atomic_write_text(p.out / "report.md", format_markdown(p, rows))
