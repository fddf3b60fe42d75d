"""Paired statistics over seeds (tskd.reporting.paired) and the report's section built on them
(tskd.reporting.report_paired): checked against scipy's own paired t-test and the textbook sample sizes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from scipy import stats

from tskd.reporting.paired import paired_difference, pooled_sd, power, seeds_needed
from tskd.reporting.report import format_markdown, summaries
from tskd.reporting.report_paired import comparisons, paired_tables, parent_metrics, record
from tskd.spec.config import parse_preset

REPO = Path(__file__).resolve().parents[1]
KD = [70.0, 71.5, 69.2, 70.8]
NOISE = {"tskd": [0.8, 1.1, 0.9, 1.2], "at": [0.1, -0.2, 0.3, -0.1], "vanilla": [-2.1, -1.9, -2.2, -2.0]}


def test_paired_difference_is_scipys_paired_t_test():
    a, b = {0: 70.1, 1: 70.9, 2: 71.3, 3: 70.0}, {0: 69.8, 1: 70.2, 2: 70.4, 3: 70.1, 9: 99.0}  # seed 9: no pair
    d = paired_difference(a, b)
    seeds = [0, 1, 2, 3]
    ref = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    ci = ref.confidence_interval(0.95)
    assert d.n == 4 and d.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    assert d.outcome == "tie" and not d.significant and d.low < 0 < d.high


def test_outcomes_untested_and_identical_runs():
    assert paired_difference({0: 1.0}, {0: 0.5}).outcome == "untested"
    assert paired_difference({0: 1.0}, {0: 0.5}).cell() == "+0.50 (n=1)"
    assert paired_difference({0: 1.0}, {1: 0.5}).n == 0
    same = paired_difference({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})  # the demo's TSKD = KD case
    assert (same.mean, same.low, same.high, same.p, same.outcome) == (0.0, 0.0, 0.0, 1.0, "tie")
    up = paired_difference({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 1.9, 2: 3.1})
    assert up.outcome == "win" and up.cell().startswith("**+") and up.p < 0.05
    down = paired_difference({0: 1.0, 1: 1.9, 2: 3.1}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert down.outcome == "loss" and down.high < 0


def test_seed_planner_gives_the_textbook_sample_sizes():
    # Paired t, two-sided 0.05, 80 % power, effect d = delta / sd: n = 10 (d = 1), 34 (d = 0.5), 90 (d = 0.3).
    assert seeds_needed(0.3, 0.3) == 10 and seeds_needed(1.0, 0.5) == 34 and seeds_needed(1.0, 0.3) == 90
    n = seeds_needed(0.7, 0.3)
    assert power(n, 0.7, 0.3) >= 0.8 > power(n - 1, 0.7, 0.3)
    assert seeds_needed(None, 0.3) is None and seeds_needed(0.0, 0.3) == 2 and seeds_needed(100.0, 0.01) == 10_001


def test_pooled_sd_weights_by_degrees_of_freedom():
    d1 = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})  # sd 1, 2 df
    d2 = paired_difference({0: 0.0, 1: 2.0}, {0: 0.0, 1: 0.0})  # sd sqrt(2), 1 df
    sd, df = pooled_sd([d1, d2, paired_difference({0: 1.0}, {0: 0.0})])
    assert df == 3 and sd == pytest.approx(((2 * 1 + 1 * 2) / 3) ** 0.5)


def _preset(tmp_path, by_method: dict | None = None):
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    raw["methods"] = {"vanilla": {}, "kd": {}, "at": {}, "tskd": {"delta": 1, "k": 2}}
    raw["seeds"] = [0, 1, 2, 3]
    if by_method:
        raw["recipes"]["student"]["by_method"] = by_method
    return parse_preset(raw)


def _figures(v: float) -> dict:
    """Every figure column of a row (as collect_rows writes them), all at ``v``."""
    from tskd.reporting.report import figure_columns
    from tskd.tasks import task_of

    return {k: (1 if k.endswith("epoch") else v) for k in figure_columns(task_of("cifar100"))}


def _rows(p) -> list[dict]:
    q = p.pairs[0]
    rows = [{"recipe": "teacher", "pair": "teacher", "teacher": "", "student": q.teacher, "method": "vanilla",
             "seed": 0, **_figures(80.0)}]
    for m in ("vanilla", "kd", "at", "tskd"):
        for s, base in enumerate(KD):
            v = base + (NOISE[m][s] if m in NOISE else 0.0)
            rows.append({"recipe": "student", "pair": q.name, "teacher": q.teacher, "student": q.student, "method": m,
                         "seed": s, **_figures(v)})
    return rows


def test_report_section_marks_what_exceeds_seed_noise(tmp_path):
    p = _preset(tmp_path)
    rows = _rows(p)
    cs = comparisons(p, rows)
    by = {(c.method, c.baseline): c.diff for c in cs}
    assert set(by) == {("at", "kd"), ("tskd", "kd"), ("kd", "vanilla"), ("at", "vanilla"), ("tskd", "vanilla")}
    assert by["tskd", "kd"].outcome == "win" and by["at", "kd"].outcome == "tie"
    assert by["tskd", "kd"].mean == pytest.approx(1.0) and by["kd", "vanilla"].mean == pytest.approx(2.05)
    assert record(cs, "tskd", "kd", "student") == {"win": 1, "tie": 0, "loss": 0, "untested": 0}
    md = "\n".join(paired_tables(p, rows, cs))
    pair = p.pairs[0].name
    tskd = next(line for line in md.splitlines() if line.startswith(f"| {pair} | tskd |"))
    assert f"**{by['tskd', 'kd'].cell().strip('*')}**" in tskd and "| 4 |" in tskd
    at = next(line for line in md.splitlines() if line.startswith(f"| {pair} | at |"))
    assert "**" not in at.split("|")[4]  # at vs KD: a tie, not bold
    assert "| tskd | 1 / 0 / 0 | 1 / 0 / 0 |" in md and "| at | 0 / 1 / 0 |" in md
    # The planner: tskd vs KD's paired std is that of NOISE["tskd"]; its seeds for 0.3 and 0.5.
    sd = stats.tstd(NOISE["tskd"])
    assert f"| tskd | KD | {sd:.2f} | 3 | {seeds_needed(sd, 0.3)} | {seeds_needed(sd, 0.5)} |" in md
    assert "Seed planner" in md and "95% confidence interval" in md and "pairing is partial" not in md
    # The whole report holds the section; the DVC summaries and the parents get the same numbers.
    assert "## Paired differences" in format_markdown(p, rows)
    summary = summaries(p, rows)["tskd"]["student"]
    assert summary[pair]["vs_kd"]["diff"] == pytest.approx(1.0) and summary[pair]["best"] > 0
    assert summary["record_vs_kd"] == {"win": 1, "tie": 0, "loss": 0, "untested": 0}
    metrics = parent_metrics(cs)[("student", pair, "tskd")]
    assert metrics["vs_kd_p"] == pytest.approx(by["tskd", "kd"].p, abs=1e-6) and metrics["vs_student_n"] == 4


def test_report_files_carry_the_comparison(tmp_path):
    """write_report on a result tree: report.csv's rows carry their group's comparison; the DVC
    summary file too."""
    from tests.test_report import _tskd_preset, _write_tskd_runs
    from tskd.reporting.report import write_report

    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, teacher_top1=60.0)  # tskd = kd + 1 and kd = student alone + 2 on each seed
    write_report(p)
    with (p.out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    tskd = [r for r in rows if r["method"] == "tskd"]
    assert len(tskd) == 2 and all(float(r["vs_kd_best_top1_diff"]) == 1.0 for r in tskd)
    assert all(float(r["vs_student_best_top1_diff"]) == 3.0 and r["vs_kd_best_top1_n"] == "2" for r in tskd)
    assert all(r["vs_kd_best_top1_diff"] == "" for r in rows if r["method"] in ("kd", "vanilla"))
    summary = json.loads((p.out / "summary" / "kd.json").read_text())
    assert summary["student"]["resnet20-resnet8"]["vs_student"]["diff"] == 2.0
    md = (p.out / "report.md").read_text()
    assert "| resnet20-resnet8 | tskd | 2 | **+1.00 [+1.00, +1.00]** | < 0.001 |" in md


def test_report_says_where_a_method_trains_with_another_recipe(tmp_path):
    """by_method (mdistiller trains CRD and ReviewKD on ImageNet at another batch size): the seed still
    pairs initialisation and image order, not the schedule, and the report says so."""
    p = _preset(tmp_path, by_method={"at": {"batch_size": 7}})
    rows = _rows(p)
    md = "\n".join(paired_tables(p, rows, comparisons(p, rows)))
    notes = md.split("Where the pairing is partial:")[1].split("|")[0]
    assert "at and KD train with different recipe values (batch_size 7 vs" in notes
    assert "at and the student alone train with different recipe values (batch_size 7 vs" in notes
    assert "tskd and" not in notes
