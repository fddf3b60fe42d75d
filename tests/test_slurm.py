"""Training through SLURM (submitit) against the real local cluster of slurm/local-cluster.sh.

* the launch settings are validated (file and key named) and checked against the cluster
  before anything is submitted;
* a failing or cancelled job fails the waiting call with the job id and its log;
* a requeued or preempted job resumes from its checkpoint and ends as an uninterrupted run;
* the smoke DAG under ``--profile slurm`` trains every run as a SLURM job and reports the
  same numbers as a local run. The grid is reduced to keep the test short (methods vanilla
  and kd, one seed, 5+5 images per class, 2 epochs); the local run uses the same grid.

Run with ``pytest -s tests/test_slurm.py`` to see the measured latencies and wall times.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import copy_repo, run_cli
from tskd.errors import ParamsError

pytest_plugins = ["tests.slurm_fixtures"]  # the slurm_cluster fixture

SUBMITTED = re.compile(r"submitted SLURM job (\d+)")
STARTED = re.compile(r"tskd-job: .* started ([0-9.]+) s after submission")


def _report(msg: str) -> None:
    print(f"[slurm] {msg}", file=sys.stderr)


def _launch_file(path: Path, **defaults) -> Path:
    """A launch file for the local cluster; keyword arguments replace ``defaults`` keys."""
    d = {"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10} | defaults
    path.write_text(yaml.safe_dump({"backend": "slurm", "poll_s": 2, "defaults": d}))
    return path


def _sacct(job_id: str, fields: str, duplicates: bool = False) -> list[str]:
    cmd = ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields] + (["-D"] if duplicates else [])
    return [ln for ln in subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines() if ln]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the launching process ended (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _ckpt_epoch(path: Path) -> int:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["epoch"]
    except Exception:
        return -1


def _history(metrics: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]


class Cli:
    """``tskd train --spec ... --launch FILE`` in the background, its output in a file."""

    def __init__(self, spec, launch: Path, log: Path):
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "tskd.cli", "train", "--no-track", "--spec",
                                          spec.model_dump_json(), "--launch", str(launch)],
                                         stdout=f, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text()

    def job_id(self) -> str:
        return _wait(lambda: (m := SUBMITTED.search(self.text())) and m.group(1), 60, "the job id", self.proc)


# -- settings, no cluster needed --------------------------------------------------------------
def test_launch_file_errors_name_the_file_and_the_key(tmp_path):
    from tskd.launch import load_launch_file

    cases = {
        "defaults:\n  gpus: 1\n": ("defaults.gpus", "unknown key", "gpus_per_node"),
        "rules:\n  techer: {timeout_min: 5}\n": ("rules.techer", "teacher"),
        "defaults:\n  timeout_min: 0\n": ("defaults.timeout_min", "greater than or equal to 1"),
        "defaults:\n  additional_parameters: {time: 10}\n": ("additional_parameters.time", "timeout_min"),
        "backend: pbs\n": ("backend", "slurm"),
    }
    for text, expected in cases.items():
        f = tmp_path / "launch.yaml"
        f.write_text(text)
        with pytest.raises(ParamsError) as e:
            load_launch_file(f)
        for part in (str(f), *expected):
            assert part in str(e.value), (text, str(e.value))


def test_rule_settings_replace_defaults_and_merge_sbatch_options(tmp_path):
    from tskd.launch import load_settings

    f = tmp_path / "launch.yaml"
    f.write_text(yaml.safe_dump({
        "defaults": {"partition": "debug", "timeout_min": 30, "additional_parameters": {"qos": "normal"}},
        "rules": {"teacher": {"partition": "gpu", "gpus_per_node": 1,
                              "additional_parameters": {"constraint": "a100"}}}}))
    t, s = load_settings(f, "teacher"), load_settings(f, "student")
    assert (t.resources.partition, t.resources.gpus_per_node, t.resources.timeout_min) == ("gpu", 1, 30)
    assert t.resources.additional_parameters == {"qos": "normal", "constraint": "a100"}
    assert (s.resources.partition, s.resources.gpus_per_node) == ("debug", 0)
    assert t.where("partition") == f"{f}: rules.teacher.partition"
    assert s.where("partition") == f"{f}: defaults.partition"


def test_shipped_launch_file_is_valid(repo_root):
    from tskd.launch import load_settings

    for rule in ("teacher", "student"):
        s = load_settings(repo_root / "slurm/launch.yaml", rule)
        assert s.backend == "slurm" and s.resources.timeout_min >= 10


def test_inline_backend_refuses_several_tasks(tmp_path):
    from tskd.launch import load_settings

    f = tmp_path / "launch.yaml"
    f.write_text("backend: inline\ndefaults: {tasks_per_node: 2}\n")
    with pytest.raises(ParamsError, match=r"defaults\.tasks_per_node: backend inline runs one process"):
        load_settings(f, "student")


# -- against the cluster ----------------------------------------------------------------------
@pytest.mark.parametrize("bad, expected", [
    ({"partition": "nope"}, ["defaults.partition", "unknown partition 'nope'", "debug, gpu"]),
    ({"additional_parameters": {"no-such-flag": 1}}, ["defaults.additional_parameters", "no-such-flag",
                                                      "sbatch --help"]),
], ids=["partition", "sbatch-option"])
def test_bad_cluster_values_fail_before_submission(slurm_cluster, make_spec, tmp_path, bad, expected):
    launch = _launch_file(tmp_path / "launch.yaml", **bad)
    spec = make_spec()
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json(), "--launch", str(launch), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    for part in [str(launch), *expected]:
        assert part in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (Path(spec.out_dir) / "slurm").exists()  # nothing was submitted


def test_failing_job_names_job_and_log(slurm_cluster, make_spec, tmp_path):
    from tskd.spec.config import Cifar100Data

    # Bad params that only the node can find out: the dataset directory is missing there.
    missing = tmp_path / "no-such-cifar"
    spec = make_spec(dataset=Cifar100Data(root=str(missing)))
    launch = _launch_file(tmp_path / "launch.yaml")
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json(), "--launch", str(launch), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    job = SUBMITTED.search(r.stdout).group(1)
    # The error itself first, then where the job's log is.
    m = re.search(rf"SLURM job {job} failed: \S*DatasetError: CIFAR-100 not found at {missing}.*\n  job log: (\S+)",
                  r.stderr)
    assert m, r.stderr
    assert Path(m.group(1)).is_file() and f"{job}_0_log.err" in m.group(1)
    assert not (Path(spec.out_dir) / "metrics.json").exists()


def test_crashed_job_without_result_names_job_and_log(slurm_cluster, make_spec, tmp_path):
    # The batch script dies before Python starts: no result file, only the log to go on.
    launch = _launch_file(tmp_path / "launch.yaml", setup=["echo node-side failure >&2", "exit 3"])
    spec = make_spec()
    r = run_cli("train", "--no-track", "--spec", spec.model_dump_json(), "--launch", str(launch), timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    job = SUBMITTED.search(r.stdout).group(1)
    assert f"SLURM job {job} failed: no result (state FAILED, exit code 3:0)" in r.stderr, r.stderr
    assert f"{job}_0_log.err" in r.stderr and "node-side failure" in r.stderr


def test_scancel_fails_the_waiting_call_within_a_minute(slurm_cluster, make_spec, tmp_path):
    spec = make_spec(recipe={"epochs": 200, "milestones": []})
    cli = Cli(spec, _launch_file(tmp_path / "launch.yaml"), tmp_path / "cli.log")
    job = cli.job_id()
    _wait(lambda: _sacct(job, "State") == ["RUNNING"], 60, "the job to run", cli.proc)
    t0 = time.monotonic()
    subprocess.run(["scancel", job], check=True, timeout=30)
    rc = cli.proc.wait(timeout=90)
    dt = time.monotonic() - t0
    _report(f"job {job}: scancel -> waiting call failed in {dt:.1f} s")
    assert rc == 2 and dt < 60, cli.text()
    assert f"SLURM job {job} failed: no result (state CANCELLED" in cli.text(), cli.text()
    assert f"{job}_0_log.err" in cli.text()


def test_stopping_the_waiting_call_cancels_its_job(slurm_cluster, make_spec, tmp_path):
    # What Snakemake does to its running rules on Ctrl-C: SIGTERM. The job must not be orphaned.
    spec = make_spec(recipe={"epochs": 200, "milestones": []})
    cli = Cli(spec, _launch_file(tmp_path / "launch.yaml"), tmp_path / "cli.log")
    job = cli.job_id()
    _wait(lambda: _sacct(job, "State") == ["RUNNING"], 60, "the job to run", cli.proc)
    cli.proc.terminate()
    assert cli.proc.wait(timeout=60) != 0
    assert f"cancelled SLURM job {job}" in cli.text(), cli.text()
    _wait(lambda: _sacct(job, "State")[0].startswith("CANCELLED"), 30, "sacct to show the job cancelled")


def test_requeued_and_preempted_job_resumes_to_the_same_metrics(slurm_cluster, make_spec, tmp_path):
    from tskd.engine.trainer import train

    # Long enough that the requeued step cannot finish the run in the seconds SLURM gives it after
    # its SIGTERM (which submitit ignores) before the SIGKILL: 12 epochs did, on a fast machine.
    recipe = {"epochs": 40, "milestones": [20]}
    ref = train(make_spec(out="ref", recipe=recipe))
    spec = make_spec(out="requeued", recipe=recipe)
    ckpt = Path(spec.out_dir) / "checkpoint.pt"
    # On the gpu partition with its one (fake) GPU: the GPU resources reach sbatch too.
    # timeout_min > 10: submitit counts a signal in the first (limit - 10) minutes as preemption.
    launch = _launch_file(tmp_path / "launch.yaml", partition="gpu", gpus_per_node=1, timeout_min=30)
    cli = Cli(spec, launch, tmp_path / "cli.log")
    job = cli.job_id()

    def release():
        # Slurm holds a requeued job for ~2 minutes (BeginTime); start it now instead.
        _wait(lambda: _sacct(job, "State") == ["PENDING"], 60, "the requeued job to pend", cli.proc)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)

    # 1. requeued from outside, as an administrator or a node failure would
    _wait(lambda: _ckpt_epoch(ckpt) >= 1, 300, "epoch 1", cli.proc)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    release()
    # 2. preempted: SLURM's warning signal makes submitit checkpoint the call and requeue it
    _wait(lambda: _sacct(job, "State") == ["RUNNING"], 60, "the job to run again", cli.proc)
    resumed_at = _ckpt_epoch(ckpt)
    _wait(lambda: _ckpt_epoch(ckpt) >= resumed_at + 2, 300, "two more epochs", cli.proc)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    release()
    assert cli.proc.wait(timeout=300) == 0, cli.text()

    resumed = yaml.safe_load((Path(spec.out_dir) / "metrics.json").read_text())  # JSON is YAML
    assert _history(resumed) == _history(ref)  # to the last digit
    a = torch.load(Path(make_spec(out="ref").out_dir) / "model.pt", weights_only=True)["model"]
    b = torch.load(Path(spec.out_dir) / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = "".join(p.read_text() for p in Path(spec.out_dir).glob(f"slurm/*/{job}_0_log.*"))
    assert log.count("resuming") == 2, log  # both restarts resumed from the checkpoint
    assert "this job is preempted" in log and "Requeued job" in log
    _wait(lambda: _sacct(job, "State") == ["COMPLETED"], 60, "sacct to record the end")
    rows = _sacct(job, "State,AllocTRES", duplicates=True)
    assert [row.split("|")[0] for row in rows] == ["REQUEUED", "REQUEUED", "COMPLETED"], rows
    assert all("gres/gpu=1" in row for row in rows), rows


# -- the smoke DAG under --profile slurm ------------------------------------------------------
def _snakemake(repo: Path, *args: str, db: str = "", tracking: str = "",
               check: bool = True) -> subprocess.CompletedProcess:
    # PYTHONPATH: the rules' `tskd` imports the copy's package, as the jobs do (they start in the
    # copy, whose directory comes first on their sys.path), not the installed checkout's.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking or f"sqlite:///{repo / db}", "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=repo, capture_output=True,
                       text=True, env=env, timeout=1200)
    if check:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def _numbers(report_csv: Path) -> list[dict]:
    # The results, not what they cost: device_seconds is each run's measured wall time.
    rows = [{k: v for k, v in r.items() if k != "device_seconds"} for r in csv.DictReader(report_csv.open())]
    assert rows and all(k.startswith(("vs_", "best_", "last_", "eval_", "selected_")) or k in
                        ("recipe", "pair", "teacher", "student", "method", "seed", "best_epoch") for k in rows[0])
    return sorted(rows, key=lambda r: (r["pair"], r["method"], r["seed"]))


@pytest.fixture(scope="module")
def tracking_server(slurm_cluster, tmp_path_factory):
    """slurm/mlflow-server.sh: `mlflow server` on the test cluster's MariaDB, artifacts in a
    temporary directory; stopped afterwards. The database is kept between sessions (creating
    MLflow's tables in MariaDB takes half a minute); each session logs to an experiment of its own."""
    from tests.mlflow_server import free_port

    state = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, "TSKD_MLFLOW_DIR": str(state), "TSKD_MLFLOW_PORT": str(free_port()),
           "TSKD_MLFLOW_PYTHON": sys.executable, "TSKD_MLFLOW_DB_NAME": "tskd_mlflow_test"}
    script = Path(__file__).resolve().parents[1] / "slurm/mlflow-server.sh"
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    _report(f"mlflow server on MariaDB: started in {time.monotonic() - t0:.1f} s")
    url = re.search(r"MLFLOW_TRACKING_URI=(\S+)", r.stdout).group(1)
    yield url
    subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def dag(slurm_cluster, tracking_server, tmp_path_factory):
    """The reduced smoke DAG run locally, then from scratch under --profile slurm, logging to the
    MLflow server of slurm/mlflow-server.sh."""
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    params = repo / "params/smoke.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["seeds"] = [0]
    raw["tracking"] = {"experiment": f"tskd-smoke-{uuid.uuid4().hex[:8]}"}  # this session's, on the server
    raw["methods"] = {m: raw["methods"][m] for m in ("vanilla", "kd")}  # others may need more epochs
    raw["dataset"]["synthetic"] = {"seed": 0, "train_per_class": 5, "test_per_class": 5}
    for recipe in raw["recipes"].values():
        recipe.update(epochs=2, milestones=[1])
    params.write_text(yaml.safe_dump(raw))

    t0 = time.monotonic()
    _snakemake(repo, db="mlflow-local.db")
    local_s = time.monotonic() - t0
    local_report = repo / "report-local.csv"
    shutil.copy(repo / "results/smoke/report.csv", local_report)
    after_local = _snakemake(repo, "-n", "--profile", "slurm", db="mlflow.db")

    shutil.rmtree(repo / "results")
    t0 = time.monotonic()
    run = _snakemake(repo, "--profile", "slurm", tracking=tracking_server)
    slurm_s = time.monotonic() - t0
    _report(f"reduced smoke DAG: local {local_s:.1f} s, --profile slurm {slurm_s:.1f} s")
    return {"repo": repo, "local_report": local_report, "after_local": after_local, "run": run,
            "tracking": tracking_server, "params": raw}


def _training_logs(repo: Path) -> list[Path]:
    return sorted((repo / "results/smoke/logs").glob("teachers/*.log")) + sorted(
        (repo / "results/smoke/logs").glob("students/*/*/*.log"))


@pytest.mark.slow
def test_profile_after_a_local_run_has_nothing_to_do(dag):
    out = dag["after_local"].stdout + dag["after_local"].stderr
    assert "Nothing to be done" in out, out[-3000:]


@pytest.mark.slow
def test_smoke_dag_under_profile_trains_on_slurm_and_reports_the_local_numbers(dag):
    from mlflow.tracking import MlflowClient

    repo = dag["repo"]
    assert _numbers(repo / "results/smoke/report.csv") == _numbers(dag["local_report"])

    logs = _training_logs(repo)
    assert len(logs) == 3  # one teacher, a vanilla and a kd student
    jobs = {}
    for log in logs:
        text = log.read_text()
        m = SUBMITTED.search(text)
        assert m, f"{log} does not name a SLURM job:\n{text}"
        jobs[m.group(1)] = log
        started = STARTED.search(next(repo.glob(f"results/smoke/**/slurm/*/{m.group(1)}_0_log.out")).read_text())
        _report(f"job {m.group(1)} ({log.name}): submission-to-start {float(started.group(1)):.2f} s")
    for job in jobs:
        assert _sacct(job, "State") == ["COMPLETED"], job

    # Every run went to the MLflow server (MariaDB): params, metrics, artifacts, parents.
    from tskd.spec.config import parse_preset
    from tskd.tracking.runs import grid_specs, run_name
    from tskd.tracking.store import flatten

    client = MlflowClient(tracking_uri=dag["tracking"])
    exp = client.get_experiment_by_name(dag["params"]["tracking"]["experiment"]).experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp], "tags.run_kind = 'train'")}
    specs = {run_name(s): s for s in grid_specs(parse_preset(dag["params"], "params"))}
    assert set(runs) == set(specs) and {r.info.status for r in runs.values()} == {"FINISHED"}
    assert {r.data.tags.get("slurm_job_id") for r in runs.values()} == set(jobs)
    for name, run in runs.items():
        assert flatten(specs[name].identity()).items() <= run.data.params.items(), name
        assert run.data.tags["mlflow.source.type"] == "JOB"
        assert len(client.get_metric_history(run.info.run_id, "test_top1")) == 2  # one per epoch
        assert {"metrics.json", "model.pt"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        (model,) = run.outputs.model_outputs
        assert client.get_logged_model(model.model_id).source_run_id == run.info.run_id
    parents = client.search_runs([exp], "tags.run_kind = 'seeds'")
    assert len(parents) == 3 and {p.data.metrics["n_seeds"] for p in parents} == {1.0}

    again = _snakemake(repo, "-n", db="mlflow.db")  # and a local run afterwards has nothing to do either
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_failing_job_fails_its_rule_and_leaves_no_output(dag, tmp_path):
    repo = shutil.copytree(dag["repo"], tmp_path / "repo", symlinks=True)  # the DAG's own stays as it ran
    params = repo / "params/smoke.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["methods"]["kd"]["kd_weight"] = 1.0e30  # valid params; the loss explodes on the node
    params.write_text(yaml.safe_dump(raw))
    r = _snakemake(repo, "--profile", "slurm", db="mlflow.db", check=False)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "Error in rule student" in out, out[-3000:]
    log = (repo / "results/smoke/logs/students/student/kd/resnet20-resnet8-seed0.log").read_text()
    job = SUBMITTED.search(log).group(1)
    assert re.search(rf"SLURM job {job} failed: \S*TrainingError: .*loss is", log), log
    assert f"{job}_0_log.err" in log and "Lower the learning rate" in log, log
    # This run logs to SQLite (db=): under SLURM the rule's log warns and names the server script.
    assert "one SQLite file that every SLURM job writes" in log and "slurm/mlflow-server.sh start" in log, log
    assert f"SLURM job {job} failed" in out  # show-failed-logs: the message reaches the terminal too
    run_dir = repo / "results/smoke/students/student/kd/resnet20-resnet8/seed0"
    assert not (run_dir / "model.pt").exists() and not (run_dir / "metrics.json").exists()
    planned = _snakemake(repo, "-n", "--profile", "slurm", db="mlflow.db").stdout
    assert re.search(r"^student\s+1$", planned, re.M), planned


def test_two_task_job_trains_data_parallel(slurm_cluster, make_spec, tmp_path):
    from tskd.engine.trainer import train
    from tskd.launch import launch, load_settings

    recipe = {"epochs": 1, "batch_size": 55, "milestones": [], "augment": []}
    one = train(make_spec(out="one", recipe=recipe))
    launch_file = _launch_file(tmp_path / "launch.yaml", tasks_per_node=2)
    two = launch(make_spec(out="two", recipe=recipe), load_settings(launch_file, "student"))
    # srun started two ranks (gloo); tolerances as in tests/test_ddp.py
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-4)
    assert abs(two["history"][0]["test_top1"] - one["history"][0]["test_top1"]) <= 0.5 + 1e-9
    outs = sorted(p.name for p in Path(make_spec(out="two").out_dir).glob("slurm/*/*_log.out"))
    assert len(outs) == 2 and outs[1].endswith("_1_log.out"), outs


def test_import_teacher_runs_as_a_job_too(slurm_cluster, make_spec, tmp_path):
    from tskd.engine.trainer import train

    trained = make_spec(out="trained", role="teacher", recipe={"epochs": 1, "milestones": []})
    train(trained)
    spec = make_spec(out="imported", role="teacher")
    r = run_cli("import-teacher", "--spec", spec.model_dump_json(), "--checkpoint",
                str(Path(trained.out_dir) / "model.pt"), "--launch", str(_launch_file(tmp_path / "launch.yaml")),
                timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert SUBMITTED.search(r.stdout) and "imported" in r.stdout
    metrics = yaml.safe_load((Path(spec.out_dir) / "metrics.json").read_text())
    assert metrics["method"] == "imported" and metrics["last_top1"] >= 0
