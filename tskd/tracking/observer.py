"""The tracker as an observer of the training loop: every run recorded in MLflow through its journal.

Each attempt appends to a journal in the run's directory (tskd.tracking.journal) and applies it to
the MLflow store when the store answers; nothing here fails a run for want of a tracking server.
A resumed attempt goes on with the journal its checkpoint names, so a killed and resumed run stays
one MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from tskd.engine.events import Observer, RunView
from tskd.spec.grid import RunSpec
from tskd.tracking import runs as tr
from tskd.tracking.journal import RUN_FILE, Journal, JournaledRun, apply, close_earlier

log = logging.getLogger("tskd.train")


def start_record(run: RunView, supersedes: list[str]) -> dict[str, Any]:
    """The journal's first record of a run: its MLflow name, tags (tskd.tracking.runs), params (the
    identity, every default filled in), its group's parent and its dataset input."""
    spec, data = run.spec, run.data
    return {"experiment": spec.experiment, "name": tr.run_name(spec), "params": run.identity,
            "tags": tr.run_tags(spec, run.world.size, run.tags),
            "parent": {"preset": spec.preset, "group": tr.group_name(spec)},
            "dataset": {"name": data.name, "identity": data.identity, "root": getattr(spec.dataset, "root", None),
                        "counts": tr.identity_counts(data)},
            "supersedes": supersedes}


def model_record(spec: RunSpec) -> dict[str, Any]:
    """The logged model that the run's end records for its model.pt artifact."""
    # Logged-model names allow no ":" (MLflow refuses it).
    return {"name": tr.run_name(spec).replace(":", "-"), "artifact": "model.pt", "step": spec.recipe.epochs,
            "tags": {"role": spec.role, "method": spec.method, "variant": spec.variant or spec.method,
                     tr.GROUP_TAG: tr.group_name(spec)}}


class TrackingObserver(Observer):
    """Records the run in MLflow (main rank only): params and tags at the start, each epoch's history
    row, the final figures and cost, metrics.json, model.pt and the method's files, the end status."""

    name = "tracking"

    def __init__(self) -> None:
        self.journal_id: str | None = None  # the journal this attempt goes on with
        self.tracker: JournaledRun | None = None
        self._orphans: list[str] = []  # MLflow runs of earlier attempts kept outside any journal (older tskd)

    def on_discarded(self, run: RunView, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("mlflow_run_id"):  # a checkpoint of a tskd before journals
            self._orphans.append(checkpoint["mlflow_run_id"])

    def on_resume(self, run: RunView, state: dict[str, Any] | None, epoch: int, step: int | None) -> None:
        self.journal_id = (state or {}).get("journal")

    def on_run_start(self, run: RunView) -> None:
        """This attempt's journal: the checkpoint's when resuming, else a new one. Earlier attempts'
        journals still open end KILLED (a run killed before its first checkpoint, or superseded)."""
        if not run.world.main:
            return
        journal = Journal(run.out, self.journal_id) if self.journal_id else None
        if journal is not None and journal.path.is_file():
            journal.append("resume")
        else:
            journal = Journal.begin(run.out)
            close_earlier(run.out, journal)
            earlier = list(self._orphans)
            with contextlib.suppress(OSError, ValueError, AttributeError):
                legacy = json.loads((run.out / RUN_FILE).read_text())
                if "journal" not in legacy and legacy.get("run_id"):  # written by a tskd before journals
                    earlier.append(legacy["run_id"])
            journal.append("start", **start_record(run, sorted(set(earlier))))
        self.journal_id = journal.id
        self.tracker = JournaledRun(journal)
        if self.tracker.flush(force=True):
            for other in Journal.all_in(run.out):  # the closed ones, while the store answers
                if other.id != journal.id and other.pending():
                    with contextlib.suppress(Exception):
                        apply(other)

    def on_epoch_end(self, run: RunView, epoch: int, row: dict[str, Any]) -> None:
        if self.tracker:
            self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)

    def on_run_end(self, run: RunView, metrics: dict[str, Any], files: list[Path]) -> None:
        if not self.tracker:
            return
        # Recorded first, applied once: a store that is down costs one attempt here, and the records
        # reach it later (`tskd sync`); the run's result is complete either way.
        spec, t = run.spec, self.tracker
        final = {f"{w}_{f}": metrics[f"{w}_{f}"] for w in ("best", "last") for f in run.task.figures}
        t.log_metrics(final | {k: metrics[k] for k in ("devices", "device_seconds")}, step=spec.recipe.epochs,
                      flush=False)
        for f in files:
            t.log_artifact(f, flush=False)
        t.finish("FINISHED", model=model_record(spec), flush=False)
        if not t.flush(force=True):
            log.warning("%s: %d MLflow records wait in %s; `tskd sync` logs them once the store answers",
                        run.out, t.journal.pending(), t.journal.path)

    def on_run_failed(self, run: RunView, error: BaseException) -> None:
        if self.tracker:
            self.tracker.finish("FAILED")

    def state_dict(self) -> dict[str, Any]:
        return {"journal": self.journal_id}


def tracking_observers(track: bool) -> list[Observer]:
    """The observers of a run that is (``track``) or is not recorded in MLflow."""
    return [TrackingObserver()] if track else []
