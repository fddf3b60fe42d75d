"""MLflow records as the UI shows them, on a real store: names, tags, parents, dataset, model."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.kill import KillAt
from tests.mlflow_server import mlflow_server
from tskd.tracking.observer import TrackingObserver


def _smoke(repo_root: Path, tmp_path: Path):
    from tskd.spec.config import load_preset

    p = load_preset(repo_root / "params/smoke.yaml")
    return p.model_copy(update={"results_dir": str(tmp_path / "results")})


def _run(client, out_dir: str):
    return client.get_run(json.loads((Path(out_dir) / "mlflow_run.json").read_text())["run_id"])


@pytest.mark.slow
def test_grid_runs_are_named_tagged_grouped_under_a_parent_and_summarised(make_spec, mlflow_uri, repo_root,
                                                                          tmp_path, one_thread):
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.reporting.publish import summarize_parents
    from tskd.tracking.runs import find_parent_id, prepare_store

    p = _smoke(repo_root, tmp_path)
    parents = prepare_store(p)  # what the DAG's onstart does
    distilled = {f"{m}:resnet20-resnet8:student" for m in p.methods if m != "vanilla"}
    assert set(parents) == {"teacher:resnet20", "vanilla:resnet8:student"} | distilled
    assert prepare_store(p) == parents  # a second DAG run keeps them
    # newest first, as the UI lists them: the teachers' parents head the table
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp_id = client.get_experiment_by_name("tskd-smoke").experiment_id
    newest = client.search_runs([exp_id], order_by=["attributes.start_time DESC"])
    assert newest[0].info.run_id == parents["teacher:resnet20"]

    one_epoch = {"epochs": 1, "milestones": []}
    common = dict(preset="smoke", experiment="tskd-smoke", recipe=one_epoch)
    teacher = make_spec(out="teacher", role="teacher", arch="resnet20", recipe_name="teacher", **common)
    students = [make_spec(out=f"s{k}", arch="resnet8", recipe_name="student", seed=k, **common) for k in (0, 1)]
    results = [train(s, observers=[TrackingObserver()]) for s in (teacher, *students)]

    client = MlflowClient(tracking_uri=mlflow_uri)
    # The experiment opens on its training runs in MLflow 3's UI, not the GenAI overview.
    assert client.get_experiment_by_name("tskd-smoke").tags["mlflow.experimentKind"] == "custom_model_development"
    t_run = _run(client, teacher.out_dir)
    s_runs = [_run(client, s.out_dir) for s in students]
    assert t_run.info.run_name == t_run.data.tags["mlflow.runName"] == "seed0 teacher r20"
    assert t_run.data.tags["role"] == "teacher" and t_run.data.tags["student"] == "resnet20"
    assert [r.info.run_name for r in s_runs] == ["seed0 r8 s vanilla", "seed1 r8 s vanilla"]
    assert t_run.data.tags["mlflow.parentRunId"] == parents["teacher:resnet20"]
    assert {r.data.tags["mlflow.parentRunId"] for r in s_runs} == {parents["vanilla:resnet8:student"]}
    for run in (t_run, *s_runs):
        tags = run.data.tags
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"].startswith("tskd train")
        assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.git.dirty"] in ("true", "false")
        assert tags["run_kind"] == "train" and tags["mlflow.user"]
        assert run.data.params["method_params.ce_weight"] == "1.0"  # a default the spec left out
        # The dataset input (the UI's Dataset column): its name and a digest of the data's identity.
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.name == run.data.tags["dataset"] and len(ds.dataset.digest) == 16
        assert json.loads(ds.dataset.profile)["identity"] == run.data.params["data_identity"]
        # The logged model (the UI's Models column), pointing at the run's own model.pt.
        (out,) = run.outputs.model_outputs
        model = client.get_logged_model(out.model_id)
        assert model.source_run_id == run.info.run_id and model.status == "READY"
        assert model.name == run.info.run_name.replace(":", "-") and model.tags["model_file"].endswith("/model.pt")
        # its page shows the run's params and final metrics
        assert model.params == run.data.params
        final = {m.key: m.value for m in model.metrics}
        assert final["best_top1"] == run.data.metrics["best_top1"] and final.keys() == run.data.metrics.keys()
        assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}

    # The report stage: the parent carries its seeds' mean and std, its group's figures from the
    # report (found by the parent's recipe, pair and variant tags), and is FINISHED.
    group = {("student", "resnet8", "vanilla"): {"vs_x_diff": 1.5}, ("student", "resnet8", "kd"): {"vs_x_diff": 9.0}}
    assert summarize_parents(p, ["best_top1", "last_top1"], group) == 2
    # made again to start with its first child (its duration their span, not the DAG's): found by its tags
    parent = client.get_run(find_parent_id(client, exp_id, "smoke", "vanilla:resnet8:student"))
    assert parent.info.start_time == s_runs[0].info.start_time
    best = [r["best_top1"] for r in results[1:]]
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_seeds"] == 2
    assert parent.data.metrics["best_top1_mean"] == pytest.approx(statistics.fmean(best))
    assert parent.data.metrics["best_top1_std"] == pytest.approx(statistics.stdev(best))
    assert parent.info.run_name == "r8 s vanilla" and parent.data.tags["run_kind"] == "seeds"
    assert parent.data.metrics["vs_x_diff"] == 1.5
    # What the group cost: its seeds' device-seconds (epochs' wall time × 1 thread), on each run and summed.
    assert all(r["devices"] == 1.0 and r["device_seconds"] > 0 for r in results)
    assert [r.data.metrics["device_seconds"] for r in s_runs] == [r["device_seconds"] for r in results[1:]]
    assert parent.data.metrics["device_seconds"] == pytest.approx(sum(r["device_seconds"] for r in results[1:]))
    assert "vs_x_diff" not in client.get_run(find_parent_id(client, exp_id, "smoke", "teacher:resnet20")).data.metrics
    # A group none of whose seeds ran is not RUNNING (nothing runs it), and has no figures.
    kd = client.get_run(parents["kd:resnet20-resnet8:student"])
    assert kd.info.status == "SCHEDULED" and "best_top1_mean" not in kd.data.metrics


@pytest.mark.slow
def test_a_resume_while_the_server_is_down_makes_no_second_run(make_spec, tmp_path, monkeypatch):
    """A run killed after an epoch resumes while the server is down: it finishes, and once the server
    is back its records go on in the run it had, not in a new one."""
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.tracking.journal import sync_dirs

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    spec = make_spec(recipe={"epochs": 2, "milestones": []})
    out = Path(spec.out_dir)
    backend, artifacts = f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts"
    with mlflow_server(backend, artifacts) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with pytest.raises(KeyboardInterrupt):  # a job killed in its second epoch
            train(spec, observers=[TrackingObserver(), KillAt(1)])
        first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    train(spec, observers=[TrackingObserver()])  # the server is down: the run finishes all the same
    assert (out / "metrics.json").is_file()
    with mlflow_server(backend, artifacts, port=int(url.rsplit(":", 1)[1])):
        assert sync_dirs([out])["pending"] == 0
        client = MlflowClient(tracking_uri=url)
        (run,) = client.search_runs([client.get_experiment_by_name("tskd-test").experiment_id])
        assert run.info.run_id == first and run.info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(first, "test_top1")) == [1, 2]


def _log_at_once(uri: str, run_id: str, barrier) -> None:
    import logging

    from mlflow.tracking import MlflowClient

    from tskd.tracking.runs import log_dataset

    logging.disable(logging.CRITICAL)
    client = MlflowClient(uri)
    barrier.wait()
    log_dataset(client, run_id, "synthetic-cifar100", "cifar100 manifest sha256:00", None, {"train": 1})


def test_jobs_that_start_together_all_log_their_dataset(tmp_path):
    """Six jobs log the same dataset at once (as a DAG's parallel jobs do): the store takes the dataset's row
    from one of them and refuses the others' (a unique key); each must still end linked to it."""
    import multiprocessing as mp

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("race")
    runs = [client.create_run(exp).info.run_id for _ in range(6)]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(runs))
    procs = [ctx.Process(target=_log_at_once, args=(uri, r, barrier)) for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(runs)
    assert [[d.dataset.name for d in client.get_run(r).inputs.dataset_inputs] for r in runs] == \
        [["synthetic-cifar100"]] * len(runs)
