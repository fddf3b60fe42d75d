"""A run's MLflow records, kept in its own directory first: tracking never decides whether training succeeds.

Every record a training run makes (its creation with tags and params, each epoch's metrics, its
artifacts, its end) is appended to a journal in the run directory, ``<out>/tracking/<id>.jsonl``,
and then applied to the store. When the store cannot be reached (the server is down, restarting,
or accepts connections and never answers) the record stays in the journal and training goes on;
the next attempt comes after a back-off, at a later epoch, at the run's end, or from
``tskd sync`` (which ``tskd report`` runs first). Applying is idempotent: how far a journal got is
kept beside it (``<id>.state.json``), and a run created just before that state was written is found
again by its ``tskd.journal`` tag instead of being created twice.

One journal per attempt to train a run: a resume goes on with the checkpoint's journal; a run that
starts from nothing begins a new one and closes the older ones still open (their runs end KILLED).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tskd.engine.run_lock import lock_if_free
from tskd.io import atomic_write_json
from tskd.spec.grid import student_dir, student_jobs, teacher_dir
from tskd.tracking.runs import PARENT_TAG, find_parent_id, log_dataset, log_model
from tskd.tracking.store import flatten, open_experiment, retry_locked

log = logging.getLogger("tskd.tracking")

JOURNAL_DIR = "tracking"
JOURNAL_TAG = "tskd.journal"
RUN_FILE = "mlflow_run.json"  # the run id once the store has the run: what other tools read

# What one request to a tracking server may cost a training job. MLflow's own defaults (120 s
# timeout, 7 retries with exponential back-off: about four minutes a call) suit a client with
# nothing else to do; a job keeps its records in its journal and tries again later instead.
# A user's own settings of these variables win. Set only while a job applies its records
# (``job_http_limits``): MLflow reads them at each request, and nothing else in the process changes.
JOB_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                     "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@contextlib.contextmanager
def job_http_limits() -> Iterator[None]:
    """``JOB_HTTP_DEFAULTS`` for the block, where the environment does not set them."""
    added = [k for k in JOB_HTTP_DEFAULTS if k not in os.environ]
    os.environ.update({k: JOB_HTTP_DEFAULTS[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def now_ms() -> int:
    return int(time.time() * 1000)


def journal_dir(out_dir: Path) -> Path:
    return Path(out_dir) / JOURNAL_DIR


class Journal:
    """One attempt's records: an append-only JSON-lines file and how many of its lines the store has."""

    def __init__(self, out_dir: Path, jid: str):
        self.out = Path(out_dir)
        self.id = jid
        self.path = journal_dir(out_dir) / f"{jid}.jsonl"
        self.state_path = journal_dir(out_dir) / f"{jid}.state.json"

    @classmethod
    def begin(cls, out_dir: Path) -> Journal:
        # Sortable by time: the order of attempts in a directory is the order of their names.
        j = cls(out_dir, f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")
        j.path.parent.mkdir(parents=True, exist_ok=True)
        return j

    @classmethod
    def all_in(cls, out_dir: Path) -> list[Journal]:
        d = journal_dir(out_dir)
        return [cls(out_dir, p.stem) for p in sorted(d.glob("*.jsonl"))] if d.is_dir() else []

    def append(self, op: str, **fields: Any) -> None:
        """One record, flushed and synced: a kill right after this call keeps it."""
        line = json.dumps({"op": op, "time": now_ms(), **fields}, sort_keys=True) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def ops(self) -> list[dict[str, Any]]:
        """The records, in order. A last line cut by a kill mid-write is not a record."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                break
        return out

    def state(self) -> dict[str, Any]:
        try:
            s = json.loads(self.state_path.read_text())
            return s if isinstance(s, dict) else {}
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_json(self.state_path, state)

    def is_open(self, ops: list[dict[str, Any]] | None = None) -> bool:
        """Whether its run has started (or resumed) and not ended."""
        status_ops = [o["op"] for o in (self.ops() if ops is None else ops) if o["op"] in ("start", "resume", "finish")]
        return bool(status_ops) and status_ops[-1] != "finish"

    def pending(self) -> int:
        """Records the store does not have yet."""
        return len(self.ops()) - int(self.state().get("applied", 0))


# -- applying records to the store -------------------------------------------------------------
def apply(journal: Journal, store: tuple[Any, str] | None = None) -> int:
    """Apply the records the store does not have yet, in order; returns how many were applied.
    ``store``: (client, experiment id) when the caller has them (a job applies every epoch), else
    opened here. Raises whatever the store raises (the caller decides what a failure costs); what
    was applied before the failure is recorded."""
    ops = journal.ops()
    state = journal.state()
    done = int(state.get("applied", 0))
    if done >= len(ops):
        return 0
    start = next((o for o in ops if o["op"] == "start"), None)
    if start is None:
        raise ValueError(f"{journal.path}: no start record")
    client, exp_id = store or open_experiment(start["experiment"])
    run_id = state.get("run_id")
    applied = 0
    for i in range(done, len(ops)):
        op = ops[i]
        if op["op"] == "start":
            run_id = _apply_start(client, exp_id, journal, op)
            state["run_id"] = run_id
            atomic_write_json(journal.out / RUN_FILE, {"run_id": run_id, "experiment": start["experiment"],
                                                       "journal": journal.id})
        else:
            _APPLY[op["op"]](client, exp_id, run_id, journal, ops[:i], op)
        state["applied"] = i + 1
        journal.save_state(state)
        applied += 1
    return applied


def _apply_start(client, exp_id: str, journal: Journal, op: dict[str, Any]) -> str:
    from mlflow.entities import Param

    # Created before a kill or a lost answer, but not recorded: the same run, not a second one.
    found = retry_locked(lambda: client.search_runs([exp_id], f"tags.`{JOURNAL_TAG}` = '{journal.id}'", max_results=1))
    if found:
        run_id = found[0].info.run_id
    else:
        tags = dict(op["tags"]) | {JOURNAL_TAG: journal.id}
        parent = op.get("parent")
        pid = find_parent_id(client, exp_id, parent["preset"], parent["group"]) if parent else None
        if pid:
            tags[PARENT_TAG] = pid
        run_id = retry_locked(lambda: client.create_run(exp_id, start_time=op["time"], run_name=op["name"],
                                                  tags=tags)).info.run_id
    items = [Param(k, v) for k, v in flatten(op.get("params", {})).items()]
    for i in range(0, len(items), 100):
        retry_locked(lambda chunk=items[i:i + 100]: client.log_batch(run_id, params=chunk))
    if op.get("dataset"):
        ds = op["dataset"]
        log_dataset(client, run_id, ds["name"], ds["identity"], ds.get("root"), ds["counts"])
    for earlier in op.get("supersedes", []):  # runs of earlier attempts outside any journal
        _kill_if_running(client, earlier)
    return run_id


def _kill_if_running(client, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        status = retry_locked(lambda: client.get_run(run_id)).info.status
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if status == "RUNNING":
        retry_locked(lambda: client.set_terminated(run_id, status="KILLED"))


def _apply_resume(client, exp_id, run_id, journal, before, op) -> None:
    retry_locked(lambda: client.update_run(run_id, status="RUNNING"))


def _apply_metrics(client, exp_id, run_id, journal, before, op) -> None:
    from mlflow.entities import Metric

    batch = [Metric(k, float(v), op["time"], op["step"]) for k, v in op["values"].items()]
    retry_locked(lambda: client.log_batch(run_id, metrics=batch))


def _apply_artifact(client, exp_id, run_id, journal, before, op) -> None:
    path = journal.out / op["path"]
    if not path.is_file():  # removed since (a rerun's cleaning): nothing to upload
        log.warning("%s: no longer there; not logged on MLflow run %s", path, run_id)
        return
    retry_locked(lambda: client.log_artifact(run_id, str(path), op.get("dir")))


def _apply_finish(client, exp_id, run_id, journal, before, op) -> None:
    model = op.get("model")
    logged = {o["path"] for o in before if o["op"] == "artifact"}
    if op["status"] == "FINISHED" and model and model["artifact"] in logged:
        run = retry_locked(lambda: client.get_run(run_id))
        if not run.outputs or not run.outputs.model_outputs:  # not logged by an earlier, interrupted apply

            retry_locked(lambda: log_model(client, exp_id, run_id, **model))
    retry_locked(lambda: client.set_terminated(run_id, status=op["status"], end_time=op["time"]))


_APPLY = {"resume": _apply_resume, "metrics": _apply_metrics, "artifact": _apply_artifact, "finish": _apply_finish}


# -- what a training job holds ------------------------------------------------------------------
class JournaledRun:
    """A training run's tracker: records go to the journal at once and reach the store when it answers.

    No method raises for a tracking failure: a failed apply is logged once per outage and retried
    after a back-off (``retry_s``, doubling up to ``max_retry_s``), at the next record or ``flush``."""

    def __init__(self, journal: Journal, retry_s: float = 30.0, max_retry_s: float = 300.0):
        self.journal = journal
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._next_try = 0.0
        self._wait = retry_s
        self._down_since: float | None = None
        self._store: tuple[Any, str] | None = None  # (client, experiment id), opened once

    def record(self, op: str, flush: bool = True, **fields: Any) -> None:
        try:
            self.journal.append(op, **fields)
        except OSError as e:
            # A full disk, most likely: the record is lost, but the training (or the error it is
            # failing with) is not replaced by tracking's; the checkpoint's write says what is wrong.
            log.warning("%s: MLflow record %r not kept (%s)", self.journal.path, op, e)
            return
        if flush:
            self.flush()

    def log_metrics(self, metrics: dict[str, float], step: int, flush: bool = True) -> None:
        self.record("metrics", flush, step=step, values={k: float(v) for k, v in metrics.items()})

    def log_artifact(self, path: Path, directory: str | None = None, flush: bool = True) -> None:
        self.record("artifact", flush, path=str(Path(path).relative_to(self.journal.out)), dir=directory)

    def finish(self, status: str, model: dict[str, Any] | None = None, flush: bool = True) -> None:
        self.record("finish", flush, status=status, model=model)

    def flush(self, force: bool = False) -> bool:
        """Apply what is pending unless within a back-off (``force``: try anyway). True when the
        store has every record."""
        if not force and time.monotonic() < self._next_try:
            return False
        try:
            with job_http_limits():
                if self._store is None:
                    self._store = open_experiment(self.journal.ops()[0]["experiment"])
                apply(self.journal, self._store)
        except Exception as e:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("MLflow unreachable (%s: %s); training goes on, its records wait in %s and reach "
                            "MLflow when it answers again (or by `tskd sync`)", type(e).__name__,
                            str(e).splitlines()[0][:300] if str(e) else "", self.journal.path)
            self._next_try = time.monotonic() + self._wait
            self._wait = min(self._wait * 2, self.max_retry_s)
            return False
        if self._down_since is not None:
            log.info("MLflow answers again after %.0f s; the records kept meanwhile are logged",
                     time.monotonic() - self._down_since)
        self._down_since, self._wait, self._next_try = None, self.retry_s, 0.0
        return True


def close_earlier(out_dir: Path, current: Journal | None) -> None:
    """Journals of earlier attempts that will not be continued: end their runs KILLED (a record,
    applied with the rest)."""
    for j in Journal.all_in(out_dir):
        if (current is None or j.id != current.id) and j.is_open():
            j.append("finish", status="KILLED", model=None)


def _sync_dir(out_dir: Path) -> tuple[int, int]:
    """Apply every journal of a run directory whose writer is gone; ``(applied, still pending)``.
    An open journal here belongs to a run that was stopped: its run ends KILLED (a resume makes
    it RUNNING again)."""
    close_earlier(out_dir, None)
    applied = pending = 0
    for j in Journal.all_in(out_dir):
        try:
            applied += apply(j)
        except Exception as e:
            log.warning("%s: %d records not applied: %s", j.path, j.pending(), str(e).splitlines()[0][:300])
        pending += j.pending()
    return applied, pending


def sync_dirs(dirs: list[Path]) -> dict[str, int]:
    """``_sync_dir`` on every directory that has journals and no live writer (a running job applies
    its own). Returns counts: ``runs`` synced, records ``applied``, records still ``pending``
    (the store did not answer), ``live`` directories left to their writer."""
    totals = {"runs": 0, "applied": 0, "pending": 0, "live": 0}
    for d in dirs:
        if not journal_dir(d).is_dir():
            continue
        with lock_if_free(d) as free:
            if not free:
                totals["live"] += 1
                continue
            applied, pending = _sync_dir(d)
        totals["runs"] += 1
        totals["applied"] += applied
        totals["pending"] += pending
    return totals


def grid_dirs(p: Any) -> list[Path]:
    """Every training run directory of a preset's grid, teachers first."""
    return [teacher_dir(p, a) for a in p.teachers] + [student_dir(p, j) for j in student_jobs(p)]
