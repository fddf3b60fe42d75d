"""The ImageNet smoke DAG end to end with real Snakemake, in a temporary copy of the repo (a module of
its own, so that a test worker runs it beside the CIFAR smoke DAG of test_workflow.py)."""

from __future__ import annotations

import csv
import re

import pytest

from tests.conftest import copy_repo
from tests.snakemake_runs import TRAINING, snakemake

pytestmark = pytest.mark.slow


def test_imagenet_smoke_dag_runs_every_method_on_both_pairs(tmp_path):
    """The ImageNet grid's shape end to end on the tiny synthetic ImageNet (real layout), on CPU."""
    from mlflow.tracking import MlflowClient

    from tskd.spec.config import load_preset
    from tskd.spec.grid import student_jobs

    repo = copy_repo(tmp_path / "repo")
    snakemake(repo, "--configfile", "params/imagenet_smoke.yaml")
    p = load_preset(repo / "params/imagenet_smoke.yaml")
    rows = list(csv.DictReader((repo / "results/imagenet_smoke/report.csv").open()))
    assert {(r["pair"], r["method"]) for r in rows if r["pair"] != "teacher"} == {
        (j.pair.name, j.method) for j in student_jobs(p)} and len(student_jobs(p)) == 16
    for r in rows:
        if r["pair"] != "teacher":
            assert float(r["eval_top1"]) == pytest.approx(float(r["last_top1"]), abs=1e-6)
    assert "dataset `synthetic-imagenet`" in (repo / "results/imagenet_smoke/report.md").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tskd-imagenet_smoke").experiment_id], TRAINING)
    assert len(runs) == 2 + 16 and {r.info.status for r in runs} == {"FINISHED"}
    assert {(r.data.tags["dataset"], r.data.tags["dataset_family"]) for r in runs} == {
        ("synthetic-imagenet", "imagenet")}
    # mdistiller's per-method recipe values reach the runs: CRD and ReviewKD at their own batch size.
    crd = next(r for r in runs if r.data.tags["method"] == "crd")
    kd = next(r for r in runs if r.data.tags["method"] == "kd")
    assert crd.data.params["recipe.batch_size"] == "10" and kd.data.params["recipe.batch_size"] == "20"
    assert "Nothing to be done" in snakemake(repo, "-n", "--configfile", "params/imagenet_smoke.yaml").stdout


def test_imagenet_dry_run_lists_every_job_without_data(tmp_path):
    from tskd.spec.config import load_preset
    from tskd.spec.grid import student_jobs

    repo = copy_repo(tmp_path)
    p = load_preset(repo / "params/imagenet.yaml")
    out = snakemake(repo, "-n", "--quiet", "rules", "--configfile", "params/imagenet.yaml").stdout
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(\d+)\s*$", out, re.M)}
    n = len(student_jobs(p))
    assert n == 2 * len(p.methods) and jobs["student"] == n and jobs["teacher"] == 2 and jobs["data"] == 1, jobs
    assert not (repo / "results").exists()
