"""Faults of the cluster itself, injected under a training run: real parts only (the test cluster of
slurm/local-cluster.sh: SLURM with accounting on MariaDB; the MLflow server of slurm/mlflow-server.sh
on that same MariaDB; real training subprocesses and SLURM jobs).

* the tracking database restarts under the MLflow server mid-run: the job goes on, its records wait
  in its journal and reach MLflow when the database is back; SLURM accounting (slurmdbd, on the
  same database) answers again afterwards;
* the node fails under a SLURM job: SLURM requeues the job, the waiting call keeps waiting (it must
  not take the job's NODE_FAIL for its end) and the job resumes from its last checkpoint to the
  numbers of an uninterrupted run; a job that may not be requeued fails the waiting call, which
  names it and NODE_FAIL, and run again it resumes the same way.

Run with ``pytest -s tests/test_cluster_faults.py`` to see what each fault cost.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.mlflow_server import free_port
from tests.slurm_fixtures import SCRIPT as CLUSTER_SCRIPT
from tests.test_slurm import Cli, _ckpt_epoch, _history, _sacct, _wait
from tests.test_tracking_faults import _applied, _journal, _metric_steps, _start_job
from tests.test_tracking_faults import _wait as _wait_job

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.slurm_fixtures"]  # the slurm_cluster fixture

REPO = Path(__file__).resolve().parents[1]


def _report(msg: str) -> None:
    print(f"[cluster-faults] {msg}", file=sys.stderr)


def _cluster(cmd: str) -> str:
    r = subprocess.run(["bash", str(CLUSTER_SCRIPT), cmd], capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"local-cluster.sh {cmd}: rc {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


def _accounting_answers() -> bool:
    """slurmdbd answers from its database: what `sacct` and the waiting calls need."""
    r = subprocess.run(["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"], capture_output=True,
                       text=True, timeout=30)
    s = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-S", "now-1hours"], capture_output=True,
                       text=True, timeout=30)
    return r.returncode == 0 and "tskd" in r.stdout.split() and s.returncode == 0 and "error" not in s.stderr


# -- 1. the tracking database restarts under the MLflow server ---------------------------------
@pytest.fixture
def mariadb_tracking_server(slurm_cluster, tmp_path):
    """slurm/mlflow-server.sh on the test cluster's MariaDB, a database of its own (kept between
    sessions: MLflow's schema takes half a minute to create); each test logs to an experiment of its own."""
    state = tmp_path / "mlflow-server"
    env = {**os.environ, "TSKD_MLFLOW_DIR": str(state), "TSKD_MLFLOW_PORT": str(free_port()),
           "TSKD_MLFLOW_PYTHON": sys.executable, "TSKD_MLFLOW_DB_NAME": "tskd_mlflow_faults"}
    script = REPO / "slurm/mlflow-server.sh"
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    _report(f"mlflow server on MariaDB: started in {time.monotonic() - t0:.1f} s")
    yield re.search(r"MLFLOW_TRACKING_URI=(\S+)", r.stdout).group(1)
    subprocess.run(["bash", str(script), "stop"], capture_output=True, text=True, env=env, timeout=120)


def test_the_tracking_database_restarting_mid_run_loses_no_record_and_no_epoch(mariadb_tracking_server,
                                                                               make_spec):
    from mlflow.tracking import MlflowClient

    url, epochs = mariadb_tracking_server, 10
    spec = make_spec(recipe={"epochs": epochs, "milestones": []}, experiment=f"tskd-faults-{uuid.uuid4().hex[:8]}")
    out = Path(spec.out_dir)
    t0 = time.monotonic()
    proc = _start_job(spec, url)
    db_down = False
    try:
        _wait_job(lambda: _applied(out) >= 2, proc, "the run and its first epoch in MLflow")
        # Held while MariaDB stops (a second or two), so that the run cannot end before it is down.
        os.kill(proc.pid, signal.SIGSTOP)
        _cluster("stop-db")
        db_down, t_down = True, time.monotonic()
        assert not _accounting_answers()  # the database is gone for slurmdbd too
        os.kill(proc.pid, signal.SIGCONT)
        # The job trains on without its database (a few seconds): four epochs' records wait in its journal.
        _wait_job(lambda: _journal(out).pending() >= 4, proc, "four epochs kept while the database is down")
        kept = _journal(out).pending()
        # Held while MariaDB starts, so that it is back within the run.
        os.kill(proc.pid, signal.SIGSTOP)
        _cluster("start-db")
        db_down, down_s = False, time.monotonic() - t_down
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(300) == 0, proc.stdout.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
        if db_down:
            _cluster("start-db")
    took = time.monotonic() - t0
    log = proc.stdout.read()
    assert "MLflow unreachable" in log and "Traceback" not in log, log[-3000:]
    assert (out / "metrics.json").is_file() and (out / "model.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == list(range(1, epochs + 1))  # no epoch lost or redone
    j = _journal(out)
    assert j.pending() == 0  # caught up within the run: nothing left for `tskd sync`

    client = MlflowClient(url)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _metric_steps(client, run_id) == list(range(1, epochs + 1))  # every epoch, once
    assert run.data.metrics["best_top1"] == metrics["best_top1"]
    assert {"model.pt", "metrics.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert len(run.outputs.model_outputs) == 1
    exp = client.get_experiment_by_name(spec.experiment).experiment_id
    assert [r.info.run_id for r in client.search_runs([exp])] == [run_id]  # never a duplicate
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")  # nothing left RUNNING

    # SLURM accounting shares the database: slurmdbd reconnects by itself (the tests after this need it).
    _wait(_accounting_answers, 60, "sacct to answer after the database restart")
    said = "; ".join(ln.split(": ", 1)[-1][:160] for ln in log.splitlines() if "MLflow" in ln)
    _report(f"database down {down_s:.1f} s under the run ({kept} records kept meanwhile, {len(j.ops())} in all, "
            f"0 lost); run of {epochs} epochs {took:.1f} s; the job said: {said}")


# -- 2. the node fails under a SLURM job --------------------------------------------------------
def _node() -> str:
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30,
                           check=True).stdout.split()
    assert len(set(nodes)) == 1, nodes  # the test cluster's one node
    return nodes[0]


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def _restore_node(node: str) -> None:
    """Back in service whatever happened (every other test shares this node). With ReturnToService=2
    a node whose slurmd answers may already be back; `resume` only applies to a node still down."""
    if not re.fullmatch(r"(idle|mixed|allocated|completing)", _node_state(node)):
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True, timeout=30)
    _wait(lambda: re.fullmatch(r"(idle|mixed|allocated|completing)", _node_state(node)), 60,
          f"node {node} back in service")


def _release_when_gone(job: str) -> None:
    """Start the requeued job now instead of after SLURM's hold (BeginTime, ~2 minutes), once its
    earlier run has left the node: submitit ignores SIGTERM, so that run lives on until KillWait's
    SIGKILL, and slurmd refuses a second copy of a job it still holds, draining the node."""
    def gone() -> bool:
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, timeout=30).stdout
        return f"slurmstepd: [{job}." not in ps

    _wait(gone, 60, f"job {job}'s earlier run to leave the node")
    time.sleep(3)  # slurmd polls a job's steps every second before it lets the job go
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


def _launch(path: Path, **resources) -> Path:
    """A launch file for the test cluster, polling sacct every second: the waiting call sees the
    job's NODE_FAIL, which sacct shows for a few seconds only."""
    d = {"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10} | resources
    path.write_text(yaml.safe_dump({"backend": "slurm", "poll_s": 1, "defaults": d}))
    return path


@pytest.mark.parametrize("requeue", [True, False], ids=["requeued", "not-requeueable"])
def test_a_node_failing_under_a_job_costs_at_most_the_epoch_in_progress(slurm_cluster, make_spec, tmp_path,
                                                                         requeue):
    """SLURM requeues a job whose node fails (its default): the waiting call waits on and the job resumes
    from its checkpoint. A job that may not be requeued (--no-requeue) fails the waiting call, naming the
    job and NODE_FAIL; run again, it resumes. Either way: the numbers of an uninterrupted run."""
    from tskd.engine.trainer import train

    recipe = {"epochs": 30, "milestones": [15]}
    t0 = time.monotonic()
    ref = train(make_spec(out="ref", recipe=recipe))
    ref_s = time.monotonic() - t0
    spec = make_spec(out="nodefail", recipe=recipe)
    ckpt = Path(spec.out_dir) / "checkpoint.pt"
    extra = {} if requeue else {"additional_parameters": {"no-requeue": True}}
    cli = Cli(spec, _launch(tmp_path / "launch.yaml", **extra), tmp_path / "cli.log")
    job = cli.job_id()
    jobs, procs = [job], [cli.proc]
    try:
        node = _node()
        try:
            # Accounting has the run (sacct lags a job's start by seconds), and it has checkpointed.
            _wait(lambda: _sacct(job, "State") == ["RUNNING"], 60, "sacct to show the job running", cli.proc)
            at = _wait(lambda: (e := _ckpt_epoch(ckpt)) >= 2 and e, 300, "a checkpoint of epoch 2", cli.proc)
            t0 = time.monotonic()
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=tskd-test"], check=True,
                           timeout=30)
            if requeue:  # the job's run ends NODE_FAIL and SLURM requeues it: a new record, pending
                _wait(lambda: (rows := _sacct(job, "State", duplicates=True)) and rows[0] == "NODE_FAIL"
                      and rows[-1] == "PENDING", 60, "SLURM to requeue the job", cli.proc)
            else:
                assert cli.proc.wait(timeout=120) == 2, cli.text()
            fault_s = time.monotonic() - t0
        finally:
            _restore_node(node)
        text = cli.text()
        if requeue:
            held = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r until %S"], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
            _release_when_gone(job)
            assert cli.proc.wait(timeout=300) == 0, cli.text()
            text = cli.text()
            # sacct shows the NODE_FAIL for a few seconds, or not at all when accounting lags: if the
            # waiting call saw it, it said why and waited on.
            saw = f"SLURM job {job}: NODE_FAIL" in text
            assert not saw or "its node failed and SLURM requeued it" in text, text
            _wait(lambda: _sacct(job, "State", duplicates=True) == ["NODE_FAIL", "COMPLETED"], 60,
                  "sacct to record the end")
            rerun = job
        else:
            held, saw = "not requeued", True
            assert f"SLURM job {job} failed: no result (state NODE_FAIL" in text, text
            assert "its node failed and SLURM did not requeue it" in text and f"{job}_0_log.err" in text, text
            assert "Traceback" not in text and not (Path(spec.out_dir) / "metrics.json").exists()
            assert _sacct(job, "State", duplicates=True) == ["NODE_FAIL"]
            again = Cli(spec, _launch(tmp_path / "launch.yaml"), tmp_path / "again.log")  # the rule's rerun
            rerun = again.job_id()
            jobs.append(rerun)
            procs.append(again.proc)
            assert again.proc.wait(timeout=300) == 0, again.text()
        total_s = time.monotonic() - t0
    finally:  # nothing of this test left in the shared queue, whatever failed
        for p in procs:
            if p.poll() is None:
                p.terminate()  # the waiting call cancels its job
                p.wait(timeout=60)
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)

    err = next(Path(spec.out_dir).glob(f"slurm/*/{rerun}_0_log.err")).read_text()
    m = re.search(r"resuming \S+ at epoch (\d+)", err)
    assert m and int(m.group(1)) >= at + 1, err[-3000:]  # from the last checkpoint, not from scratch
    resumed = yaml.safe_load((Path(spec.out_dir) / "metrics.json").read_text())  # JSON is YAML
    assert _history(resumed) == _history(ref)  # to the last digit
    first = next(Path(spec.out_dir).glob(f"slurm/*/{job}_0_log.err")).read_text()
    if requeue:
        first = first[:m.start()]
    logged = max(int(e) for e in re.findall(r" epoch (\d+)/30 ", first))
    seen = ("requeued; the waiting call saw NODE_FAIL" if saw else "requeued; NODE_FAIL not seen by the waiting call"
            ) if requeue else "not requeueable"
    _report(f"job {job} ({seen}): node down after the checkpoint of "
            f"epoch {at}; its run went on to epoch {logged} (SIGTERM ignored until SIGKILL); {held}; resumed at "
            f"epoch {m.group(1)} (job {rerun}); fault to result {total_s:.1f} s ({fault_s:.1f} s to "
            f"{'the requeue' if requeue else 'the failed call'}); inline reference {ref_s:.1f} s")


def test_status_tells_a_queued_job_from_one_whose_waiting_rule_was_killed(slurm_cluster, tmp_path):
    """A job submitted and not started has no lock yet: `tskd status` asks SLURM's queue whether it is
    still pending (waiting) or gone with its killed Snakemake (stopped), instead of calling it running."""
    from tskd.workflow.status import job_status

    r = subprocess.run(["sbatch", "--hold", "--parsable", "--job-name", "tskd-status-test", "--wrap", "sleep 60"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    out, log = tmp_path / "run", tmp_path / "run.log"
    out.mkdir()
    log.write_text(f"tskd: train {out}: submitted SLURM job {job} (partition (default), ...)\n")
    try:
        pending = job_status("kd r8 seed0", out, log, epochs=2)
        assert (pending.state, pending.writer) == ("waiting", f"SLURM job {job} pending"), pending
    finally:
        subprocess.run(["scancel", job], timeout=60)
    queue = ["squeue", "-h", "-o", "%i"]
    _wait(lambda: job not in subprocess.run(queue, capture_output=True, text=True).stdout.split(), 60,
          "the cancelled job to leave the queue")
    time.sleep(1.1)  # squeue is asked once a second
    assert job_status("kd r8 seed0", out, log, epochs=2).state == "stopped"
