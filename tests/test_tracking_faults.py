"""The tracking server goes away: training never fails or loses work for it, and the records reach
MLflow when it answers again (later in the run, at its end, or by `tskd sync`). Real `mlflow server`
processes, killed and restarted; real training subprocesses."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.mlflow_server import free_port, mlflow_server

pytestmark = pytest.mark.slow


def _journal(out: Path):
    from tskd.tracking.journal import Journal

    (j,) = Journal.all_in(out)
    return j


def _applied(out: Path) -> int:
    from tskd.tracking.journal import Journal

    return sum(j.state().get("applied", 0) for j in Journal.all_in(out))


def _start_job(spec, url: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    return subprocess.Popen([sys.executable, "-m", "tskd.cli", "train", "--spec", spec.model_dump_json()],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(cond, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before {what}: rc {proc.returncode}\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _job_then_server_gone(make_spec, tmp_path, epochs: int, applied: int):
    """A training job logging to a real server that is stopped once the store has ``applied`` of the
    job's records. Returns (spec, job, server backend, port)."""
    spec = make_spec(recipe={"epochs": epochs, "milestones": []})
    out, backend, port = Path(spec.out_dir), f"sqlite:///{tmp_path / 'store.db'}", free_port()
    with mlflow_server(backend, tmp_path / "artifacts", port=port) as url:
        proc = _start_job(spec, url)
        _wait(lambda: _applied(out) >= applied, proc, f"{applied} records in MLflow")
    return spec, proc, backend, port


def _metric_steps(client, run_id: str, key: str = "test_top1") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _assert_complete(client, out: Path, epochs: int) -> None:
    """The run in the store holds what an undisturbed run's holds: every epoch, its end, its files."""
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _metric_steps(client, run_id) == list(range(1, epochs + 1))
    assert run.data.metrics["best_top1"] == json.loads((out / "metrics.json").read_text())["best_top1"]
    assert {"model.pt", "metrics.json"} <= {a.path for a in client.list_artifacts(run_id)}
    assert len(run.outputs.model_outputs) == 1
    assert run.data.params["method_params.ce_weight"] == "1.0"
    assert len(run.inputs.dataset_inputs) == 1
    exp = client.get_experiment_by_name("tskd-test").experiment_id
    assert len(client.search_runs([exp])) == 1  # never a duplicate


def test_server_killed_mid_run_and_back_the_run_finishes_and_mlflow_gets_every_epoch(make_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs = 6
    spec, proc, backend, port = _job_then_server_gone(make_spec, tmp_path, epochs, applied=2)  # the first epoch
    out = Path(spec.out_dir)
    # The server is gone: the job goes on, its records wait in its journal.
    _wait(lambda: _journal(out).pending() > 0, proc, "an epoch kept while the server is down")
    # Held while the server restarts (seconds on a loaded machine), so that it is back within the run.
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with mlflow_server(backend, tmp_path / "artifacts", port=port) as url:
            os.kill(proc.pid, signal.SIGCONT)
            assert proc.wait(300) == 0, proc.stdout.read()[-3000:]
            log = proc.stdout.read()
            assert "MLflow unreachable" in log and "Traceback" not in log
            assert _journal(out).pending() == 0  # caught up within the run
            _assert_complete(MlflowClient(url), out, epochs)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)


def test_server_down_through_the_end_keeps_the_result_and_sync_logs_it_later(make_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs = 3
    spec, proc, backend, port = _job_then_server_gone(make_spec, tmp_path, epochs, applied=1)  # the run
    out = Path(spec.out_dir)
    t0 = time.monotonic()
    assert proc.wait(300) == 0, proc.stdout.read()[-3000:]
    waited = time.monotonic() - t0
    # A refused connection costs nothing like MLflow's own retry cycles (minutes per call).
    assert waited < 120, waited
    assert (out / "metrics.json").is_file() and (out / "model.pt").is_file()
    assert not list(out.glob("checkpoint*"))  # finished: nothing to resume, nothing retrained
    assert "wait in" in proc.stdout.read()
    pending = _journal(out).pending()
    assert pending > 0

    r = run_cli("sync", "--dirs", str(out), env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
                                                 "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert r.returncode == 2 and "still wait" in r.stdout and "tskd sync" in r.stderr, r.stdout + r.stderr
    with mlflow_server(backend, tmp_path / "artifacts", port=port) as url:
        r = run_cli("sync", "--dirs", str(out), env={"MLFLOW_TRACKING_URI": url})
        assert r.returncode == 0 and f"{pending} records of 1 runs logged" in r.stdout, r.stdout + r.stderr
        _assert_complete(MlflowClient(url), out, epochs)
        r = run_cli("sync", "--dirs", str(out), env={"MLFLOW_TRACKING_URI": url})
        assert "0 records of 1 runs logged" in r.stdout, r.stdout + r.stderr
        _assert_complete(MlflowClient(url), out, epochs)


class _Silent:
    """A server that accepts connections and never answers (a hung process, a full accept queue's
    far side): every request waits for its timeout."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_server_that_never_answers_costs_bounded_time_and_loses_nothing(make_spec, tmp_path):
    from mlflow.tracking import MlflowClient

    epochs = 2
    spec = make_spec(recipe={"epochs": epochs, "milestones": []})
    out = Path(spec.out_dir)
    silent = _Silent()
    try:
        t0 = time.monotonic()
        # 3 s a request instead of the jobs' 10 (tskd.tracking.journal.JOB_HTTP_DEFAULTS), to keep the test short.
        r = run_cli("train", "--spec", spec.model_dump_json(),
                    env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.port}", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
        took = time.monotonic() - t0
    finally:
        silent.close()
    assert r.returncode == 0, r.stderr[-3000:]
    # One attempt at the start, none while backing off, one at the end: each (1 + 1 retry) x 3 s of
    # waiting on the silent server. Read from the run's own phase clock (its "seconds:" log line),
    # not the harness's wall time, which a loaded machine stretches.
    line = re.search(r": seconds: (.*)", r.stderr)
    assert line, r.stderr[-3000:]
    phases = {k: float(v) for k, v in (part.rsplit(" ", 1) for part in line.group(1).split(", "))}
    trained = sum(row["seconds"] for row in json.loads((out / "metrics.json").read_text())["history"])
    assert 2.9 <= phases["run start"] < 20, phases  # it asked the server once (at least one 3 s timeout)
    assert phases["epochs"] - trained < 2.9, (phases, trained)  # no request while backing off
    assert phases["teardown"] < 20, phases  # once more at the end
    assert took < 300, took  # nothing hangs
    j = _journal(out)
    assert j.pending() == len(j.ops()) and [o["op"] for o in j.ops()][-1] == "finish"
    with mlflow_server(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "artifacts") as url:
        r = run_cli("sync", "--dirs", str(out), env={"MLFLOW_TRACKING_URI": url})
        assert r.returncode == 0, r.stdout + r.stderr
        _assert_complete(MlflowClient(url), out, epochs)


def test_applying_again_after_a_lost_answer_makes_no_second_run(make_spec, mlflow_uri):
    """The store created the run but the job never learnt it (killed, or the answer lost): applying
    the journal again finds that run by its journal tag instead of creating another."""
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.tracking.journal import apply
    from tskd.tracking.observer import TrackingObserver

    spec = make_spec(recipe={"epochs": 1, "milestones": []})
    train(spec, observers=[TrackingObserver()])
    out = Path(spec.out_dir)
    j = _journal(out)
    run_id = j.state()["run_id"]
    j.state_path.unlink()  # as if no answer had come back
    (out / "mlflow_run.json").unlink()
    assert apply(j) == len(j.ops())
    assert j.state()["run_id"] == run_id
    _assert_complete(MlflowClient(mlflow_uri), out, 1)


def test_http_limits_of_a_job_bound_a_request_and_leave_a_users_own_settings(monkeypatch):
    """While a job applies its records, a request is bounded; the user's own settings win, and nothing
    else in the process sees the job's limits."""
    from tskd.tracking.journal import JOB_HTTP_DEFAULTS, job_http_limits

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "5")
    with job_http_limits():
        assert int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) * (
            1 + int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])) <= 30
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == JOB_HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
        assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "5"  # the user's
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ and os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "5"


def test_sync_refuses_a_directory_that_does_not_exist(tmp_path):
    r = run_cli("sync", "--dirs", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and f"--dirs: not a run directory: {tmp_path / 'nowhere'}" in r.stderr, r.stderr


def test_a_journal_that_cannot_be_written_never_fails_the_run(tmp_path, caplog):
    """A full disk (here: the journal's path taken by a directory) loses the record, not the run: the
    error the run meets elsewhere stays its own."""
    from tskd.tracking.journal import Journal, JournaledRun

    j = Journal.begin(tmp_path)
    j.path.mkdir()
    tracker = JournaledRun(j)
    with caplog.at_level("WARNING"):
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.finish("FAILED")
    assert "MLflow record 'metrics' not kept" in caplog.text and "'finish' not kept" in caplog.text


def test_a_stopped_run_is_killed_by_sync_and_its_resume_goes_on_in_the_same_run(make_spec, mlflow_uri):
    """A job killed after its first epoch: `tskd sync` ends its run KILLED (nobody writes it); the resume
    continues the same MLflow run, which ends FINISHED with every epoch once."""
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.tracking.observer import TrackingObserver

    spec = make_spec(recipe={"epochs": 3, "milestones": []})
    out = Path(spec.out_dir)
    proc = _start_job(spec, mlflow_uri)
    _wait(lambda: (out / "checkpoint.pt").is_file(), proc, "first checkpoint")
    proc.kill()
    proc.wait()
    client = MlflowClient(mlflow_uri)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody told MLflow
    r = run_cli("sync", "--dirs", str(out), env={"MLFLOW_TRACKING_URI": mlflow_uri})
    assert r.returncode == 0, r.stdout + r.stderr
    assert client.get_run(run_id).info.status == "KILLED"
    train(spec, observers=[TrackingObserver()])
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert set(_metric_steps(client, run_id)) == {1, 2, 3}
