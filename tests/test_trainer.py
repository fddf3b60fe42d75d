"""The training loop: outputs, MLflow records, exact resume after SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from tskd.engine.trainer import train


def _history(metrics: dict) -> list[dict]:
    # Wall-clock seconds are the only field allowed to differ between two runs.
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]


def test_train_writes_metrics_model_and_mlflow_run(make_spec, mlflow_uri):
    from mlflow.tracking import MlflowClient

    spec = make_spec(recipe={"epochs": 2, "milestones": [1]})
    m = train(spec)
    out = Path(spec.out_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert [r["epoch"] for r in m["history"]] == [0, 1]
    assert [r["lr"] for r in m["history"]] == pytest.approx([0.05, 0.005])
    assert m["last_top1"] == m["history"][-1]["test_top1"]
    assert m["best_top1"] == max(r["test_top1"] for r in m["history"])
    exported = torch.load(out / "model.pt", weights_only=True)
    assert exported["arch"] == "resnet8" and "fc.weight" in exported["model"]

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("tskd-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "vanilla" and run.data.tags["student"] == "resnet8"
    assert run.data.tags["seed"] == "0" and run.data.tags["preset"] == "test"
    assert run.data.params["recipe.lr"] == "0.05"
    history = client.get_metric_history(run.info.run_id, "test_top1")
    by_step = {h.step: h.value for h in history if h.step < 2}
    assert by_step == {r["epoch"]: pytest.approx(r["test_top1"]) for r in m["history"]}
    assert run.data.metrics["best_top1"] == pytest.approx(m["best_top1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "model.pt"} <= artifacts


def _ckpt_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception:
        return -1


def test_sigkill_then_resume_matches_uninterrupted_run(make_spec, tmp_path, mlflow_uri):
    recipe = {"epochs": 4, "milestones": [2]}
    ref = train(make_spec(out="ref", recipe=recipe), track=False)

    spec = make_spec(out="killed", recipe=recipe)
    out = Path(spec.out_dir)
    cmd = [sys.executable, "-m", "tskd.cli", "train", "--spec", spec.model_dump_json()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _ckpt_epoch(out / "checkpoint.pt") < 2:  # killed inside epoch 3, after a lr decay
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "metrics.json").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert _history(resumed) == _history(ref)  # to the last digit
    assert resumed["best_top1"] == ref["best_top1"] and resumed["last_top1"] == ref["last_top1"]
    a = torch.load(Path(make_spec(out="ref").out_dir) / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_other_params_is_not_resumed(make_spec):
    spec = make_spec(recipe={"epochs": 1, "milestones": []})
    train(spec, track=False)
    other = make_spec(recipe={"epochs": 1, "milestones": [], "lr": 0.01})
    m = train(other, track=False)
    assert m["history"][0]["lr"] == pytest.approx(0.01)


def test_nan_loss_stops_with_clear_error_and_no_outputs(make_spec):
    spec = make_spec(recipe={"lr": 1e30, "epochs": 2})
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert "loss is nan" in r.stderr.lower() or "loss is inf" in r.stderr.lower(), r.stderr
    assert "epoch 0" in r.stderr and "Traceback" not in r.stderr
    assert not (Path(spec.out_dir) / "metrics.json").exists()
    assert not (Path(spec.out_dir) / "model.pt").exists()


def test_truncated_checkpoint_is_refused(make_spec):
    spec = make_spec(recipe={"epochs": 1, "milestones": []})
    train(spec, track=False)
    out = Path(spec.out_dir)
    (out / "metrics.json").unlink()
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(out / "checkpoint.pt") in r.stderr and "truncated or corrupt" in r.stderr
    assert not (out / "metrics.json").exists()


def test_teacher_file_of_another_architecture_is_refused(make_spec, tmp_path):
    teacher = make_spec(out="teacher", arch="resnet8", recipe={"epochs": 1, "milestones": []})
    train(teacher, track=False)
    wrong = Path(teacher.out_dir) / "model.pt"
    spec = make_spec(out="student", method="kd", arch="resnet8", teacher_arch="resnet20",
                     teacher_path=str(wrong))
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(wrong) in r.stderr and "resnet20" in r.stderr and "resnet8" in r.stderr, r.stderr
    assert not (Path(spec.out_dir) / "metrics.json").exists()


def test_missing_dataset_directory_is_named(make_spec, tmp_path):
    from tskd.config import DatasetCfg

    missing = tmp_path / "no-such-cifar"
    spec = make_spec(dataset=DatasetCfg(root=str(missing)))
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(missing) in r.stderr and "download" in r.stderr.lower(), r.stderr
    assert not (Path(spec.out_dir) / "metrics.json").exists()
