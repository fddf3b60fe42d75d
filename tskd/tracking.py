"""MLflow: one run per training call, metrics per epoch, artifacts at the end.

Uses ``MlflowClient`` directly (no fluent API, so no process-global active run). The
default store is ``sqlite:///mlflow.db`` in the working directory (MLflow's file store is
deprecated); ``MLFLOW_TRACKING_URI`` overrides it, e.g. with an ``mlflow server`` that many
cluster jobs share.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    # Several local jobs share one SQLite file; a writer may briefly hold the lock.
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(0.2 * 2**i)
    raise AssertionError("unreachable")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> {"recipe.lr": "0.05", ...} (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """One MLflow run; ``run_id`` is kept in the training checkpoint so a resume continues it."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                 run_id: str | None = None):
        from filelock import FileLock
        from mlflow.tracking import MlflowClient

        uri = tracking_uri()
        db = _sqlite_path(uri)
        # Creating the SQLite schema and the experiment must not race between parallel jobs.
        lock = FileLock(str(db) + ".lock") if db else None
        if lock:
            lock.acquire(timeout=300)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                location = (db.parent / "mlartifacts").as_uri() if db else None
                exp_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
        finally:
            if lock:
                lock.release()
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            run = _retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags=tags))
            self.run_id = run.info.run_id
            flat = flatten(params)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in flat.items()]
            for i in range(0, len(items), 100):
                _retry(lambda chunk=items[i:i + 100]: self.client.log_batch(self.run_id, params=chunk))

    def _exists(self, run_id: str) -> bool:
        """Only MLflow's "does not exist" means not found; any other error (a locked or unreachable
        store) is raised, rather than answered with a duplicate run."""
        from mlflow.exceptions import MlflowException

        try:
            _retry(lambda: self.client.get_run(run_id))
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise

    def mark_killed(self, run_ids: set[str]) -> None:
        """Runs of earlier attempts that will not be continued: those still RUNNING (their process
        died before it could say so) become KILLED."""
        for run_id in sorted(run_ids):
            if self._exists(run_id) and self.client.get_run(run_id).info.status == "RUNNING":
                _retry(lambda r=run_id: self.client.set_terminated(r, status="KILLED"))

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            _retry(lambda k=k, v=v: self.client.set_tag(self.run_id, k, v))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        _retry(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: Path) -> None:
        _retry(lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, status: str = "FINISHED") -> None:
        _retry(lambda: self.client.set_terminated(self.run_id, status=status))
