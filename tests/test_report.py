"""The results table from metrics files: recipes, n, best/last/selected with their spreads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tskd.reporting.report import summaries, write_report
from tskd.spec.config import parse_preset
from tskd.spec.grid import student_dir, student_jobs, teacher_dir

REPO = Path(__file__).resolve().parents[1]


def _preset(tmp_path: Path, val: bool):
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    raw["methods"] = {"vanilla": {}, "kd": {}}
    raw["recipes"]["other"] = dict(raw["recipes"]["student"])
    raw["student_recipes"] = ["student", "other"]
    raw["dataset"]["val_fraction"] = 0.2 if val else 0.0
    return parse_preset(raw)


def _history(offset: float, val: bool) -> list[dict]:
    # Epoch 2 has the best top-1, epoch 3 the best top-5 and the best validation top-1.
    rows = [{"epoch": 1, "test_top1": 10 + offset, "test_top5": 30 + offset},
            {"epoch": 2, "test_top1": 20 + offset, "test_top5": 40 + offset},
            {"epoch": 3, "test_top1": 15 + offset, "test_top5": 50 + offset}]
    if val:
        for r, v in zip(rows, (1.0, 2.0, 3.0), strict=True):
            r["val_top1"] = v
    return rows


def _metrics(history: list[dict], val: bool) -> dict:
    from tskd.engine.trainer import summarize
    from tskd.spec.grid import RunSpec

    spec = RunSpec.model_validate({
        "preset": "t", "role": "student", "method": "kd", "arch": "resnet8", "seed": 0,
        "dataset": {"root": "x"}, "recipe": {"epochs": 3, "batch_size": 8, "lr": 0.1}, "train": {},
        "out_dir": "x", "experiment": "x"})
    return summarize(history, spec)


def _write_runs(p, val: bool) -> None:
    for arch in p.teachers:
        d = teacher_dir(p, arch)
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(_metrics(_history(50, val), val) | {"method": "vanilla"}))
    for job in student_jobs(p):
        d = student_dir(p, job)
        d.mkdir(parents=True)
        offset = job.seed + (5 if job.recipe == "other" else 0) + (1 if job.method == "kd" else 0)
        m = _metrics(_history(offset, val), val)
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "eval.json").write_text(json.dumps({"top1": m["last_top1"]}))


def test_best_top5_is_the_best_epochs_and_last_has_a_spread(tmp_path):
    m = _metrics(_history(0, False), False)
    assert m["best_epoch"] == 2 and m["best_top1"] == 20 and m["best_top5"] == 40  # not max over epochs (50)
    p = _preset(tmp_path, val=False)
    _write_runs(p, val=False)
    md = write_report(p).read_text()
    # One table per recipe; n, best and last top-1 and top-5, each mean ± std over the 2 seeds.
    assert "## Students, recipe `student`" in md and "## Students, recipe `other`" in md
    assert "| pair | method | n | best top-1 | last top-1 | best top-5 | last top-5 |" in md
    assert "| resnet20-resnet8 | kd | 2 | 21.50 ± 0.71 | 16.50 ± 0.71 | 41.50 ± 0.71 | 51.50 ± 0.71 |" in md
    assert "| resnet20-resnet8 | kd | 2 | 26.50 ± 0.71 | 21.50 ± 0.71 | 46.50 ± 0.71 | 56.50 ± 0.71 |" in md
    assert "selected" not in md.split("## Teachers")[1]
    rows = list(csv.DictReader((p.out / "report.csv").open()))
    assert {r["recipe"] for r in rows if r["pair"] != "teacher"} == {"student", "other"}
    kd = json.loads((p.out / "summary/kd.json").read_text())
    entry = kd["other"]["resnet20-resnet8"]
    assert {k: entry[k] for k in ("best", "best_std", "last", "last_std", "n")} == {
        "best": 26.5, "best_std": 0.7071, "last": 21.5, "last_std": 0.7071, "n": 2}
    # kd is 1 point above the student alone on each seed: a certain +1 with these two seeds
    assert entry["vs_student"] == {"n": 2, "diff": 1.0, "low": 1.0, "high": 1.0, "p": 0.0, "sd": 0.0}


def test_selected_epoch_is_reported_with_a_validation_split(tmp_path):
    p = _preset(tmp_path, val=True)
    _write_runs(p, val=True)
    md = write_report(p).read_text()
    assert "selected top-1" in md
    assert "| resnet20-resnet8 | kd | 2 | 21.50 ± 0.71 | 16.50 ± 0.71 | 41.50 ± 0.71 | 51.50 ± 0.71 | 16.50 ± 0.71 |" \
        in md
    assert summaries(p, [])["kd"] == {}


def test_published_numbers_beside_ours_only_on_the_official_data(tmp_path):
    from tskd.reporting.report import collect_rows, format_markdown

    raw = yaml.safe_load((REPO / "params/cifar100.yaml").read_text())
    raw.update(results_dir=str(tmp_path / "results"), seeds=[0], student_recipes=["mdistiller"],
               methods={"vanilla": {}, "kd": {}, "dkd": {}})
    raw["pairs"] = [raw["pairs"][2]]  # resnet32x4 -> resnet8x4
    p = parse_preset(raw)
    _write_runs(p, val=False)
    rows = collect_rows(p)
    md = format_markdown(p, rows, "cifar100")
    assert "| resnet32x4 | vanilla | teacher | 0 | 70.00 | 65.00 | 79.42 (last; RepDistiller (CRD) table) |" in md
    assert ("| resnet32x4-resnet8x4 | kd | 1 | 21.00 | 16.00 | 41.00 | 51.00 | "
            "73.33 (last; RepDistiller (CRD) table) |") in md
    assert ("| resnet32x4-resnet8x4 | dkd | 1 | 20.00 | 15.00 | 40.00 | 50.00 | "
            "76.32 (best; mdistiller (DKD paper)) |") in md
    assert "published" not in format_markdown(p, rows, "synthetic-cifar100")
    # The papers' tables: each published figure in the table of its kind, its source numbered.
    best, last = (md.split(f"## Recipe `mdistiller`: {k} test top-1 (%)")[1].split("## ")[0] for k in ("best", "last"))
    assert "| dkd | 20.00 (1) · Δ -1.00 · pub. 76.32<sup>1</sup> |" in best and "1. mdistiller (DKD paper)" in best
    assert "| kd | 16.00 (1) · pub. 73.33<sup>1</sup> |" in last and "1. RepDistiller (CRD) table" in last
    assert "| teacher | 65.00 (1) · pub. 79.42<sup>1</sup> |" in last and "| teacher | 70.00 (1) |" in best


def _tskd_preset(tmp_path: Path):
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    raw["methods"] = {"vanilla": {}, "tskd": {"delta": 1, "k": 2}, "kd": {}}  # not alphabetical
    return parse_preset(raw)


def _train_history(offset: float, review: bool) -> list[dict]:
    # As the trainer writes them: epochs from 1, every row with every column, TSKD's review loss
    # measured in its review epoch (3) only.
    rows = [{"epoch": e, "lr": 0.05, "train_top1": 5.0 * e, "train_ce": 4.0 - e, "train_kd": 1.0 / e,
             "train_loss": 5.0 - e, "test_top1": 10 * e + offset, "test_top5": 20 * e + offset, "seconds": 1.0}
            for e in (1, 2, 3)]
    if review:
        for r in rows:
            r["train_review"] = 0.25 if r["epoch"] == 3 else None
    return rows


def _write_evolution(d) -> None:
    """Two watched images, two memory nodes, one tap: the maps grow brighter from node to node."""
    import numpy as np
    import torch

    from tskd.engine.evolution import write_evolution

    ramp = torch.linspace(0, 1, 64).view(8, 8)
    records = [{"epoch": e, "label": f"M{e}", "maps": {"tap0": torch.stack([ramp * e, ramp.T * e])}} for e in (1, 2)]
    images = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    write_evolution(d / "evolution.npz", images, [0, 5], {"tap0": torch.stack([ramp, ramp.T])}, records)


def _write_tskd_runs(p, teacher_top1: float) -> None:
    d = teacher_dir(p, "resnet20")
    d.mkdir(parents=True)
    teacher = _metrics(_train_history(teacher_top1 - 30, False), False) | {"method": "vanilla", "seed": 0}
    (d / "metrics.json").write_text(json.dumps(teacher))
    for job in student_jobs(p):
        d = student_dir(p, job)
        d.mkdir(parents=True)
        offset = job.seed + {"vanilla": 0.0, "kd": 2.0, "tskd": 3.0}[job.method]
        m = _metrics(_train_history(offset, job.method == "tskd"), False) | {"seed": job.seed}
        if job.method == "tskd":
            grid = [[0.1 * (i + j) for j in range(8)] for i in range(8)]
            m["capture"] = {"epoch": 3, "tap": 0, "frames": [grid, grid], "forecast": grid, "target": grid}
            if job.seed == 0:  # seed 1's is missing: its grid says so
                _write_evolution(d)
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "eval.json").write_text(json.dumps({"top1": m["last_top1"]}))


def test_report_in_the_papers_shape_with_delta_to_kd_and_plots(tmp_path):
    from tskd.reporting.plots import plot_files

    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, teacher_top1=60.0)
    md = write_report(p).read_text()
    # Pairs as columns, methods as rows in the preset's order (the student alone first), mean ± std (n).
    best = md.split("## Recipe `student`: best test top-1 (%)")[1].split("## ")[0]
    assert "| method | resnet20-resnet8 |" in best
    lines = [ln for ln in best.splitlines() if ln.startswith("| ") and "method" not in ln]
    assert [ln.split(" | ")[0] for ln in lines] == ["| teacher", "| student alone", "| tskd", "| kd"]
    assert "| teacher | 60.00 (1) |" in best
    assert "| student alone | 30.50 ± 0.71 (2) · Δ -2.00 |" in best
    assert "| tskd | 33.50 ± 0.71 (2) · Δ +1.00 |" in best and "| kd | 32.50 ± 0.71 (2) |" in best
    assert "## Recipe `student`: last test top-1 (%)" in md
    assert md.index("| tskd |") < md.index("| kd |")  # preset order in the detailed tables too
    assert "Warning" not in md and md.startswith("# Results") and "**Synthetic data**" in md.split("##")[0]
    # Every declared plot is a PNG, and the report links each one.
    files = plot_files(p)
    assert {f.name for f in files.values()} == {
        "teachers-test_top1.png", "student-resnet20-resnet8-test_top1.png", "student-vanilla-losses.png",
        "student-tskd-losses.png", "student-kd-losses.png", "student-tskd-review_loss.png",
        "student-resnet20-resnet8-tskd-attention.png", "student-resnet20-resnet8-tskd-seed0.png",
        "student-resnet20-resnet8-tskd-seed1.png"}
    for f in files.values():
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000, f
        assert f"(plots/{f.relative_to(p.out / 'plots').as_posix()})" in md
    # A TSKD run's grid: the image and tap row, a column per memory node and the teacher's; a run
    # without its evolution.npz gets a figure that says so (it is declared, so it is drawn).
    seed0, seed1 = (Image.open(files[f"#evolution/student/resnet20-resnet8/tskd/{s}"]) for s in (0, 1))
    assert seed0.size[0] >= 4 * 100 and seed0.size[1] >= 2 * 100 and seed1.size == (600, 200)
    # Drawn from the same runs, the plots are the same bytes (DVC outputs, hashed).
    before = {f: f.read_bytes() for f in files.values()}
    write_report(p)
    assert {f: f.read_bytes() for f in files.values()} == before


def test_report_warns_when_a_teacher_scores_below_its_student_alone(tmp_path):
    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, teacher_top1=20.0)
    md = write_report(p).read_text()
    assert ("**Warning**: the teacher resnet20 (best top-1 20.00) scores below its student resnet8 trained alone "
            "(recipe `student`: 30.50 ± 0.71 over 2 seeds): on pair resnet20-resnet8 there is nothing to distil.") in md


def test_report_warns_when_a_teacher_is_within_its_students_seed_spread(tmp_path):
    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, teacher_top1=31.0)  # above the student alone's mean (30.50), within its std (0.71)
    md = write_report(p).read_text()
    assert ("**Warning**: the teacher resnet20 (best top-1 31.00) is not clearly above its student resnet8 trained "
            "alone (recipe `student`: 30.50 ± 0.71 over 2 seeds; within one seed std): on pair resnet20-resnet8 "
            "there is little to distil") in md


def test_losses_plot_has_every_term_of_the_method(tmp_path):
    from tskd.reporting.plots.curves import loss_terms
    from tskd.tasks import task_of

    runs = [{"history": _train_history(0, True)}]
    assert loss_terms(runs, task_of("cifar100")) == ["train_ce", "train_kd", "train_review", "train_loss"]
    # TSKD's predictability monitors are history columns but no loss terms
    runs[0]["history"][-1] |= {"train_forecast_mse": 0.1, "train_last_increment_mse": 0.2, "train_predictability": 0.5}
    assert loss_terms(runs, task_of("cifar100")) == ["train_ce", "train_kd", "train_review", "train_loss"]


def test_report_gives_each_networks_size_and_each_methods_cost(tmp_path):
    """The header rows: parameters and MACs per image at the trained input size (ResNet-20 on
    CIFAR-100: 0.28 M parameters, 41 M MACs, as the papers list it); the cost table: device-hours
    per method, each run once (the student alone is listed under every pair but trained once)."""
    import re

    import torch

    from tskd.engine.checkpoint import export_model
    from tskd.models import create_model

    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, teacher_top1=60.0)
    for arch, d in [("resnet20", teacher_dir(p, "resnet20")), *((j.pair.student, student_dir(p, j))
                                                                for j in student_jobs(p))]:
        export_model(d / "model.pt", create_model(arch, num_classes=100), arch=arch, num_classes=100, epoch=3,
                     accuracy=0.0, method="vanilla", input_spec={"image_size": [32, 32]})
        m = json.loads((d / "metrics.json").read_text())
        (d / "metrics.json").write_text(json.dumps(m | {"devices": 2.0, "device_seconds": 1800.0}))
    torch.manual_seed(0)
    md = write_report(p).read_text()
    best = md.split("## Recipe `student`: best test top-1 (%)")[1].split("## ")[0]
    teacher = re.search(r"\| teacher network \| resnet20: (\d+\.\d+) M params · (\d+\.\d+) M MACs \|", best)
    assert teacher, best
    assert float(teacher[1]) == pytest.approx(0.28, abs=0.005) and float(teacher[2]) == pytest.approx(41, abs=1)
    assert re.search(r"\| student network \| resnet8: 0\.\d\d M params · \d+\.\d\d M MACs \|", best), best
    cost = md.split("## What the results cost")[1]
    assert "| teachers | 1 | 0.500 | 0.500 |" in cost and "| vanilla | 2 | 1.000 | 0.500 |" in cost
    assert "| tskd | 2 | 1.000 | 0.500 |" in cost and "| **all** | 7 | **3.500** | |" in cost
    rows = list(csv.DictReader((p.out / "report.csv").open()))
    assert {r["device_seconds"] for r in rows} == {"1800.0"}


@pytest.mark.slow
def test_report_reads_the_preset_from_a_json_file_and_writes_one_html_page(tmp_path):
    # What the workflow's report rule runs: the preset in its own order from a file, not the command line.
    from tests.conftest import run_cli
    from tskd.workflow.job_spec import write_report_preset

    p = _tskd_preset(tmp_path)
    _write_tskd_runs(p, 60.0)
    preset = write_report_preset(p, tmp_path / "presets")
    assert write_report_preset(p, tmp_path / "presets") == preset  # named by its content
    r = run_cli("report", "--json-file", str(preset), env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert r.returncode == 0, r.stderr
    html = (p.out / "report.html").read_text()
    assert "<table>" in html and "resnet20-resnet8" in html and html.count("data:image/png;base64,") >= 3
    assert html.index(">tskd<") < html.index(">kd<")  # the preset's order: tskd before kd
    r = run_cli("report", "--json-file", str(tmp_path / "nothere.json"))
    assert r.returncode == 2 and f"--json-file {tmp_path / 'nothere.json'}: cannot read it" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("report", "params/smoke.yaml", "--json-file", str(preset))
    assert r.returncode == 2 and "give one of" in r.stderr
