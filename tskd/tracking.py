"""MLflow: one run per training call, metrics per epoch, artifacts at the end.

Uses ``MlflowClient`` directly (no fluent API, so no process-global active run). The
default store is ``sqlite:///mlflow.db`` in the working directory (MLflow's file store is
deprecated); ``MLFLOW_TRACKING_URI`` overrides it, e.g. with an ``mlflow server`` that many
cluster jobs share (slurm/mlflow-server.sh). What a run carries (names, tags, parent, dataset,
model) is decided in ``tskd.tracking_runs``; the DAG sets the store up once before its jobs start,
so a job's start only reads it.
"""

from __future__ import annotations

import os
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


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def open_experiment(experiment: str) -> tuple[Any, str]:
    """(client, experiment id), creating the store's schema and the experiment when missing.

    When both exist (the DAG's set-up made them: ``tskd.tracking_runs.prepare_store``) this only
    reads, with no lock: parallel jobs start at once. Creating them takes a file lock beside a
    SQLite store, so that parallel first starts do not race on the schema."""
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is None or db.is_file():
        client = _client(uri)
        exp = _retry(lambda: client.get_experiment_by_name(experiment))
        if exp is not None:
            return client, exp.experiment_id
    from filelock import FileLock

    lock = FileLock(str(db) + ".lock") if db else None
    if lock:
        lock.acquire(timeout=300)
    try:
        client = _client(uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return client, exp.experiment_id
        location = (db.parent / "mlartifacts").as_uri() if db else None
        return client, client.create_experiment(experiment, artifact_location=location)
    finally:
        if lock:
            lock.release()


def existing_experiment(experiment: str) -> tuple[Any, str] | None:
    """(client, experiment id) when the store and the experiment exist; creates nothing."""
    uri = tracking_uri()
    db = _sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    client = _client(uri)
    exp = _retry(lambda: client.get_experiment_by_name(experiment))
    return (client, exp.experiment_id) if exp is not None else None


class RunTracker:
    """One MLflow run; ``run_id`` is kept in the training checkpoint so a resume continues it.

    ``on_create(client, experiment_id)`` returns tags only a new run needs (its parent);
    ``model``, when given, names the logged model that ``finish("FINISHED")`` records for the
    ``model.pt`` artifact (tskd.tracking_runs.log_model)."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any],
                 run_id: str | None = None, on_create: Callable[[Any, str], dict[str, str]] | None = None,
                 model: dict[str, Any] | None = None):
        self.client, self.experiment_id = open_experiment(experiment)
        self.model = model
        self.artifacts: set[str] = set()
        self.created = False
        # Only a genuine "not found" (``_exists``) starts a new run: a store that fails now raises,
        # rather than leaving the checkpoint's run behind with a duplicate beside it.
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            tags = tags | (on_create(self.client, self.experiment_id) if on_create else {})
            run = _retry(lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=tags))
            self.run_id = run.info.run_id
            self.created = True
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
        self.artifacts.add(Path(path).name)

    def finish(self, status: str = "FINISHED") -> None:
        if status == "FINISHED" and self.model and self.model["artifact"] in self.artifacts:
            from tskd.tracking_runs import log_model

            _retry(lambda: log_model(self.client, self.experiment_id, self.run_id, **self.model))
        _retry(lambda: self.client.set_terminated(self.run_id, status=status))
