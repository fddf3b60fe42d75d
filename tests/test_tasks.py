"""The task seam: the loop, metrics.json and the report take their figures from the run's task."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from tskd.data import families
from tskd.tasks import TASKS, task_of
from tskd.tasks.base import summarize_epochs
from tskd.tasks.classification import CLASSIFICATION

REPO = Path(__file__).resolve().parents[1]


def test_every_family_poses_a_known_task():
    assert set(families.TASK_OF) == set(families._MODULES)
    assert task_of("cifar100") is CLASSIFICATION and task_of("imagenet") is CLASSIFICATION
    assert task_of("coco").name == "detection"
    with pytest.raises(Exception, match="unknown dataset family 'coco2'; known: cifar100, coco, imagenet"):
        task_of("coco2")


def test_the_best_epoch_is_the_tasks_choice_and_every_figure_is_that_epochs():
    history = [{"epoch": 0, "test_a": 1.0, "test_b": 9.0, "val_a": 5.0},
               {"epoch": 1, "test_a": 3.0, "test_b": 2.0, "val_a": 4.0},
               {"epoch": 2, "test_a": 3.0, "test_b": 7.0, "val_a": 1.0}]
    m = summarize_epochs(history, "a", ("a", "b"))
    # Highest test_a, first of equals; its b, not the highest b.
    assert m == {"best_a": 3.0, "best_b": 2.0, "best_epoch": 1, "last_a": 3.0, "last_b": 7.0,
                 "selected_epoch": 0, "selected_a": 1.0, "selected_b": 9.0}
    assert "selected_epoch" not in summarize_epochs([{k: v for k, v in r.items() if k != "val_a"}
                                                     for r in history], "b", ("b",))


@pytest.fixture
def top5_task(monkeypatch):
    """A classification task that picks the best epoch on top-5: what another task would change."""
    task = dataclasses.replace(CLASSIFICATION, best="top5", figures=("top5", "top1"))  # the same methods
    monkeypatch.setitem(TASKS, task.name, task)
    return task


def test_the_loop_and_the_report_follow_the_task(top5_task, make_spec, tmp_path):
    from tskd.engine.trainer import train
    from tskd.reporting.report import write_report
    from tskd.spec.config import parse_preset
    from tskd.spec.grid import student_dir, student_jobs, teacher_dir

    m = train(make_spec(recipe={"epochs": 3, "milestones": [], "lr": 0.2}))
    h = m["history"]
    assert m["task"] == "classification"
    best = max(h, key=lambda r: r["test_top5"])
    assert (m["best_epoch"], m["best_top5"], m["best_top1"]) == (best["epoch"], best["test_top5"], best["test_top1"])
    assert "train_top1" in h[0] and "train_kd" not in h[0]

    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    raw["methods"] = {"vanilla": {}}
    p = parse_preset(raw)
    for d in [teacher_dir(p, a) for a in p.teachers] + [student_dir(p, j) for j in student_jobs(p)]:
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "eval.json").write_text(json.dumps({"top5": 12.5, "top1": 1.0}))
    md = write_report(p).read_text()
    assert md.splitlines()[2].startswith("**Synthetic data**")  # the smoke report says what it is worth
    assert "| teacher | source | recipe | seed | best top-5 | last top-5 |" in md
    assert "| pair | method | n | best top-5 | last top-5 | best top-1 | last top-1 |" in md
    header = (p.out / "report.csv").read_text().splitlines()[0].split(",")
    assert header[6:14] == ["best_top5", "best_top1", "best_epoch", "last_top5", "last_top1", "selected_top5",
                            "selected_epoch", "eval_top5"]
    # then what the run cost and its group's paired comparisons, on the task's best figure
    assert header[14] == "device_seconds" and header[15:] and all("_best_top5_" in h for h in header[15:])
    rows = list(csv.DictReader((p.out / "report.csv").open()))
    assert rows[-1]["eval_top5"] == "12.5"
