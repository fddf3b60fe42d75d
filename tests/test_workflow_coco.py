"""The COCO smoke DAG end to end with real Snakemake, in a temporary copy of the repo (a module of
its own, so that a test worker runs it beside the CIFAR smoke DAG of test_workflow.py)."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import copy_repo
from tests.snakemake_runs import TRAINING, snakemake

pytestmark = pytest.mark.slow


def test_coco_smoke_dag_trains_detectors_and_scores_them_with_cocoeval(tmp_path):
    """The COCO grid's shape end to end on the tiny synthetic COCO (real layout, COCO's ids), on CPU:
    a Faster R-CNN teacher learns (box AP > 0), every method distils from it, COCOeval scores all."""
    from mlflow.tracking import MlflowClient

    from tskd.spec.config import load_preset
    from tskd.spec.grid import student_jobs, teacher_dir

    repo = copy_repo(tmp_path / "repo")
    snakemake(repo, "--configfile", "params/coco_smoke.yaml")
    p = load_preset(repo / "params/coco_smoke.yaml")
    p = p.model_copy(update={"results_dir": str(repo / "results")})
    teacher = json.loads((teacher_dir(p, "fasterrcnn_resnet18_fpn") / "metrics.json").read_text())
    assert teacher["task"] == "detection" and teacher["best_AP"] > 0, teacher["history"]
    rows = list(csv.DictReader((repo / "results/coco_smoke/report.csv").open()))
    assert {r["method"] for r in rows if r["pair"] != "teacher"} == {"vanilla", "kd", "reviewkd", "tskd"}
    assert len(student_jobs(p)) == 4
    for r in rows:
        assert {"best_AP", "best_AP50", "last_APl"} <= set(r) and "best_top1" not in r
        if r["pair"] != "teacher":  # the exported model, evaluated again on its own, scores the same
            assert float(r["eval_AP"]) == pytest.approx(float(r["last_AP"]), abs=1e-6)
    tskd_run = next(r for r in rows if r["method"] == "tskd")
    md = (repo / "results/coco_smoke/report.md").read_text()
    assert "dataset `synthetic-coco`" in md and "| best box AP | last box AP |" in md
    history = json.loads((repo / f"results/coco_smoke/students/student/tskd/{tskd_run['pair']}/seed0/metrics.json")
                         .read_text())["history"]
    assert history[1]["train_review"] is not None and history[0]["train_review"] is None  # memory 0, review 1
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tskd-coco_smoke").experiment_id], TRAINING)
    assert len(runs) == 1 + 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["dataset_family"] for r in runs} == {"coco"}
    assert all("best_AP" in r.data.metrics for r in runs)
