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
from tests.kill import KillAt
from tskd.engine.trainer import train
from tskd.tracking.observer import TrackingObserver


def _history(metrics: dict) -> list[dict]:
    # Wall-clock seconds are the only field allowed to differ between two runs.
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]


def test_train_writes_metrics_model_and_mlflow_run(make_spec, mlflow_uri):
    from mlflow.tracking import MlflowClient

    spec = make_spec(recipe={"epochs": 2, "milestones": [1]})
    m = train(spec, observers=[TrackingObserver()])
    out = Path(spec.out_dir)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(m))
    assert [r["epoch"] for r in m["history"]] == [1, 2]  # numbered as the log's "epoch 2/2"
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
    # Every value that decides the result, defaults filled in; nothing that does not (paths, names).
    assert run.data.params["method_params.ce_weight"] == "1.0"  # vanilla's default, not in the spec
    assert run.data.params["recipe.milestone_mode"] == "at" and run.data.params["device"] == "cpu"
    assert run.data.params["data_identity"].startswith("cifar100 manifest sha256:")
    assert not {"out_dir", "experiment", "dataset.root", "train.eval_batch_size"} & set(run.data.params)
    history = client.get_metric_history(run.info.run_id, "test_top1")
    by_step = {h.step: h.value for h in history}
    assert by_step == {r["epoch"]: pytest.approx(r["test_top1"]) for r in m["history"]}
    assert run.data.metrics["best_top1"] == pytest.approx(m["best_top1"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "model.pt"} <= artifacts


def _ckpt_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(make_spec, tmp_path, mlflow_uri):
    recipe = {"epochs": 4, "milestones": [2]}
    ref = train(make_spec(out="ref", recipe=recipe))

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


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_marked_killed(make_spec, mlflow_uri):
    from mlflow.tracking import MlflowClient

    spec = make_spec(recipe={"epochs": 2, "milestones": []})
    out = Path(spec.out_dir)
    cmd = [sys.executable, "-m", "tskd.cli", "train", "--spec", spec.model_dump_json()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "mlflow_run.json").exists():  # its MLflow run exists, its first epoch has not ended
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint.pt").exists()
    killed = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(killed).info.status == "RUNNING"  # nobody told MLflow

    train(spec, observers=[TrackingObserver()])
    assert client.get_run(killed).info.status == "KILLED"
    runs = client.search_runs([client.get_experiment_by_name("tskd-test").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]


def test_checkpoint_of_other_params_is_not_resumed(make_spec):
    spec = make_spec(recipe={"epochs": 1, "milestones": []})
    train(spec)
    other = make_spec(recipe={"epochs": 1, "milestones": [], "lr": 0.01})
    m = train(other)
    assert m["history"][0]["lr"] == pytest.approx(0.01)


@pytest.mark.slow
def test_nan_loss_stops_with_clear_error_and_no_outputs(make_spec):
    spec = make_spec(recipe={"lr": 1e30, "epochs": 2})
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert "loss is nan" in r.stderr.lower() or "loss is inf" in r.stderr.lower(), r.stderr
    assert "at epoch 1 " in r.stderr and "Traceback" not in r.stderr  # numbered from 1, as the log
    assert not (Path(spec.out_dir) / "metrics.json").exists()
    assert not (Path(spec.out_dir) / "model.pt").exists()


def test_the_methods_step_hooks_get_the_step_counted_over_the_run(make_spec, monkeypatch):
    """A method's schedule in iterations (TSKD on detection) reads the global step from these hooks.
    (Recorded with a spy on the base class: the hooks are no-ops there.)"""
    from tskd.distill.base import Distiller

    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(Distiller, "on_step_start", lambda self, step: seen.append(("start", step)))
    monkeypatch.setattr(Distiller, "on_step_end", lambda self, step: seen.append(("end", step)))
    spec = make_spec(recipe={"epochs": 2, "milestones": [], "batch_size": 64})
    from tskd.engine.trainer import Trainer

    t = Trainer(spec)
    per_epoch = t.data.epoch_steps(64)
    assert per_epoch > 1
    t.run()
    assert seen == [(w, s) for s in range(2 * per_epoch) for w in ("start", "end")]


def _partial(spec, epochs: int) -> None:
    """Leave ``spec``'s directory as a run killed in epoch ``epochs + 1`` leaves it."""
    with pytest.raises(KeyboardInterrupt):
        train(spec, observers=[KillAt(epochs)])


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(make_spec, caplog):
    recipe = {"epochs": 3, "milestones": [1]}
    ref = train(make_spec(out="ref", recipe=recipe))
    spec = make_spec(recipe=recipe)
    out = Path(spec.out_dir)
    _partial(spec, 2)
    assert (out / "checkpoint.prev.pt").exists()  # epoch 1's, kept until epoch 2's was in place
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    orphan = out / ".checkpoint.pt.abc123.tmp"  # what a write killed before its rename leaves
    orphan.write_bytes(b"half")
    with caplog.at_level("WARNING"):
        m = train(spec)
    assert "falling back to the previous checkpoint" in caplog.text and "epoch 1" in caplog.text
    assert not orphan.exists()
    assert _history(m)[1:] == _history(ref)[1:]  # epoch 0 came from the checkpoint (seconds zeroed)


@pytest.mark.slow
def test_corrupt_checkpoint_without_a_previous_one_is_refused(make_spec):
    spec = make_spec(recipe={"epochs": 2, "milestones": []})
    out = Path(spec.out_dir)
    _partial(spec, 1)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(out / "checkpoint.pt") in r.stderr and "truncated or corrupt" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "metrics.json").exists()


def test_a_finished_run_asked_to_run_again_trains_again(make_spec):
    """A forced rerun (Snakemake --forcerun, a DVC rerun) trains; it never re-exports a checkpoint.
    Both remove the rule's outputs before the job starts, as done here; a job that finds the
    metrics.json of its own identity (a twin finished first) takes it: tests/test_run_lock.py."""
    spec = make_spec(recipe={"epochs": 2, "milestones": [1]})
    first = train(spec)
    assert not list(Path(spec.out_dir).glob("checkpoint*"))  # a finished run keeps no resume state
    for name in ("metrics.json", "model.pt"):
        (Path(spec.out_dir) / name).unlink()
    again = train(spec)
    assert _history(again) == _history(first)  # trained again, to the same bits on CPU
    assert [r["seconds"] for r in again["history"]] != [r["seconds"] for r in first["history"]]


def _teacher(make_spec, out: str, seed: int) -> Path:
    spec = make_spec(out=out, arch="resnet8", seed=seed, recipe={"epochs": 1, "milestones": []})
    train(spec)
    return Path(spec.out_dir) / "model.pt"


@pytest.mark.slow
def test_a_replaced_teacher_is_a_new_run_even_mid_run(make_spec, tmp_path, caplog):
    """Same path, other teacher: the student trains from the start, also when it was interrupted."""
    a, b = _teacher(make_spec, "teacher-a", 0), _teacher(make_spec, "teacher-b", 1)
    path = tmp_path / "teachers" / "model.pt"
    path.parent.mkdir()
    recipe = {"epochs": 2, "milestones": [1]}

    def student(out):
        return make_spec(out=out, method="kd", teacher_arch="resnet8", teacher_path=str(path), recipe=recipe)

    path.write_bytes(b.read_bytes())
    with_b = train(student("fresh-b"))
    path.write_bytes(a.read_bytes())
    with_a = train(student("student"))
    assert _history(with_a) != _history(with_b)

    path.write_bytes(b.read_bytes())  # finished run, then its teacher replaced
    assert _history(train(student("student"))) == _history(with_b)

    path.write_bytes(a.read_bytes())  # interrupted after an epoch with teacher a, then b
    _partial(student("student"), 1)
    path.write_bytes(b.read_bytes())
    with caplog.at_level("WARNING"):
        resumed = train(student("student"))
    assert "written for another run" in caplog.text
    assert _history(resumed) == _history(with_b)


@pytest.mark.slow
def test_teacher_file_of_another_architecture_is_refused(make_spec, tmp_path):
    teacher = make_spec(out="teacher", arch="resnet8", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    wrong = Path(teacher.out_dir) / "model.pt"
    spec = make_spec(out="student", method="kd", arch="resnet8", teacher_arch="resnet20",
                     teacher_path=str(wrong))
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(wrong) in r.stderr and "resnet20" in r.stderr and "resnet8" in r.stderr, r.stderr
    assert not (Path(spec.out_dir) / "metrics.json").exists()


@pytest.mark.slow
def test_missing_dataset_directory_is_named(make_spec, tmp_path):
    from tskd.spec.config import Cifar100Data

    missing = tmp_path / "no-such-cifar"
    spec = make_spec(dataset=Cifar100Data(root=str(missing)))
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json())
    assert r.returncode == 2
    assert str(missing) in r.stderr and "download" in r.stderr.lower(), r.stderr
    assert not (Path(spec.out_dir) / "metrics.json").exists()


def test_a_teacher_trained_on_other_statistics_is_recorded_and_can_be_renormalised(make_spec, mlflow_uri, caplog):
    from mlflow.tracking import MlflowClient

    from tskd.data.cifar import NORMALIZATION
    from tskd.engine.trainer import Trainer

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": [], "normalization": "cifar100"})
    train(teacher)
    tpath = Path(teacher.out_dir) / "model.pt"
    recorded = torch.load(tpath, weights_only=True)["input"]
    assert recorded == {"normalization": "cifar100", "mean": list(NORMALIZATION["cifar100"][0]),
                        "std": list(NORMALIZATION["cifar100"][1]), "image_size": [32, 32]}

    u = torch.rand(2, 3, 32, 32)  # images in [0, 1]

    def normalised(name):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[name])
        return (u - mean) / std

    for how, want in (("student", "cifar10"), ("renormalize", "cifar100")):
        spec = make_spec(out=f"kd-{how}", method="kd", teacher_arch="resnet8", teacher_path=str(tpath),
                         recipe={"epochs": 1, "milestones": [], "normalization": "cifar10", "teacher_input": how})
        caplog.clear()
        with caplog.at_level("WARNING"):
            t = Trainer(spec, observers=[TrackingObserver()])
        assert "trained on cifar100-normalised images" in caplog.text and f"teacher_input: {how}" in caplog.text
        seen = []
        t.distiller.teacher.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        t.distiller.teacher_forward(normalised("cifar10"))
        torch.testing.assert_close(seen[0], normalised(want), rtol=1e-5, atol=1e-5)
        if how == "renormalize":
            t.run()
            run = MlflowClient(tracking_uri=mlflow_uri).get_run(json.loads(
                (Path(spec.out_dir) / "mlflow_run.json").read_text())["run_id"])
            assert run.data.tags["teacher_input"] == "renormalize: teacher trained with cifar100, student input cifar10"
            assert run.data.params["recipe.teacher_input"] == "renormalize"


def test_expected_failures_are_one_line_and_others_keep_their_traceback(tmp_path):
    """A shape, CUDA or NCCL error in a SLURM log is useless without its traceback."""
    code = ("import sys, tskd.cli as cli\n"
            "def boom(a):\n"
            "    raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
            "cli.cmd_check = boom\n"
            "sys.exit(cli.main(['check', 'params/smoke.yaml']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "CUDA error" in r.stderr, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: [")
    r = run_cli("check", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(bad) in r.stderr
