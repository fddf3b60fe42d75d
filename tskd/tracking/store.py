"""MLflow: one run per training call, metrics per epoch, artifacts at the end.

Uses ``MlflowClient`` directly (no fluent API, so no process-global active run). The
default store is ``sqlite:///mlflow.db`` in the working directory (MLflow's file store is
deprecated); ``MLFLOW_TRACKING_URI`` overrides it, e.g. with an ``mlflow server`` that many
cluster jobs share (slurm/mlflow-server.sh). What a run carries (names, tags, parent, dataset,
model) is decided in ``tskd.tracking.runs``; the DAG sets the store up once before its jobs start,
so a job's start only reads it. A training run's records go through its journal
(``tskd.tracking.journal``): kept in its directory first, applied when the store answers.
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


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def retry_locked(fn: Callable[[], T], attempts: int = 8) -> T:
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


# MLflow 3's UI opens an experiment of this kind on its training runs, not the GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def open_experiment(experiment: str) -> tuple[Any, str]:
    """(client, experiment id), creating the store's schema and the experiment when missing.

    When both exist (the DAG's set-up made them: ``tskd.tracking.runs.prepare_store``) this only
    reads, with no lock: parallel jobs start at once. Creating them takes a file lock beside a
    SQLite store, so that parallel first starts do not race on the schema."""
    uri = tracking_uri()
    db = sqlite_path(uri)
    if db is None or db.is_file():
        client = _client(uri)
        exp = retry_locked(lambda: client.get_experiment_by_name(experiment))
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
        return client, client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    finally:
        if lock:
            lock.release()


def existing_experiment(experiment: str) -> tuple[Any, str] | None:
    """(client, experiment id) when the store and the experiment exist; creates nothing."""
    uri = tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        return None
    client = _client(uri)
    exp = retry_locked(lambda: client.get_experiment_by_name(experiment))
    return (client, exp.experiment_id) if exp is not None else None
