"""The report on MLflow, beside the tables (the report stage's last step, ``summarize_after_report``):
every parent run gets its seeds' mean and std and its group's paired comparisons
(``summarize_parents``) and the plots of its group; each TSKD run gets its evolution grid; and one
summary run per preset carries the report itself (report.md, a self-contained report.html,
report.csv) and every plot, so that MLflow alone shows which method wins and by how much more than
seed noise. What the runs themselves carry is ``tskd.tracking.runs``'s."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tskd.engine.evolution import evolution_grids
from tskd.io import atomic_write_json
from tskd.reporting.plots import plot_files
from tskd.spec.config import Preset
from tskd.spec.grid import experiment_name, student_dir
from tskd.tasks import task_of
from tskd.tracking.journal import grid_dirs, sync_dirs
from tskd.tracking.runs import KIND_TAG, PARENT_TAG, log_metrics
from tskd.tracking.store import existing_experiment, tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("tskd.tracking")

SUMMARY_KIND = "report"  # run_kind of the summary run; "seeds" for parents, "train" for runs


def parent_plots(files: dict[str, Path], tags: dict[str, str]) -> list[Path]:
    """The plots of a parent's group (from its tags) among the preset's (``plot_files``): a teacher's,
    the teachers' curves; a student group's, its pair's curves by method, its method's losses and,
    for TSKD, the pair's attention."""
    if tags.get("role") == "teacher":
        keys = ["teachers"]
    else:
        recipe, pair, method = tags.get("recipe", ""), tags.get("pair", ""), tags.get("method", "")
        keys = [k for k in files if k.startswith(f"{recipe}/{pair}/") and not k.endswith("/attention")]
        keys.append(f"{recipe}/{method}/losses")
        if method == "tskd":
            keys.append(f"{recipe}/{pair}/tskd/attention")
    return [files[k] for k in keys if k in files and files[k].is_file()]


class Uploads:
    """What this results tree already sent to which run of which store, by content: a report run again
    sends only the files whose bytes changed (the cifar100 grid's parents hold about 530 plots, each
    an HTTP upload). The record is ``results/<preset>/logs/mlflow-uploads.json``, beside the job logs
    (no DVC output); deleting it sends everything again."""

    def __init__(self, p: Preset, store: str):
        self.path, self.store, self.lock = p.out / "logs" / "mlflow-uploads.json", store, threading.Lock()
        try:
            self.sent: dict[str, str] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.sent = {}

    def send(self, client: MlflowClient, run_id: str, path: Path, folder: str | None = None) -> bool:
        """Log ``path`` on the run (under ``folder``) unless these very bytes are there already."""
        key = f"{self.store} {run_id} {folder or ''}/{path.name}"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if self.sent.get(key) == digest:
            return False
        client.log_artifact(run_id, str(path), folder)
        with self.lock:
            self.sent[key] = digest
        return True

    def save(self) -> None:
        atomic_write_json(self.path, self.sent)


def log_parent_plots(p: Preset, client: MlflowClient, parents: list, uploads: Uploads) -> int:
    """Each parent's group plots under ``plots/``; returns how many parents have any."""
    files = plot_files(p)
    todo = [(q.info.run_id, parent_plots(files, q.data.tags)) for q in parents]
    todo = [(rid, pngs) for rid, pngs in todo if pngs]

    def upload(item) -> None:
        rid, pngs = item
        for png in pngs:
            uploads.send(client, rid, png, "plots")

    with ThreadPoolExecutor(max_workers=8) as pool:  # uploads wait on the server, not the CPU
        list(pool.map(upload, todo))
    return len(todo)


def summary_run(p: Preset, client: MlflowClient, exp_id: str) -> str:
    """The preset's summary run, made once (a second report updates the same one)."""
    found = client.search_runs([exp_id], f"tags.{KIND_TAG} = '{SUMMARY_KIND}' and tags.preset = '{p.preset}'",
                               max_results=10, order_by=["attributes.start_time ASC"])
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"report {p.preset}",
                            tags={KIND_TAG: SUMMARY_KIND, "preset": p.preset, "mlflow.runName": f"report {p.preset}",
                                  "mlflow.source.name": "tskd report", "mlflow.note.content":
                                  "The preset's report: report.html (tables and plots on one page), report.md, "
                                  "report.csv, and every plot under plots/."})
    return run.info.run_id


def log_summary(p: Preset, client: MlflowClient, exp_id: str, uploads: Uploads) -> str | None:
    """The report and every plot on the summary run, marked FINISHED; None when no report exists."""
    if not (p.out / "report.md").is_file():
        return None
    rid = summary_run(p, client, exp_id)
    for name in ("report.html", "report.md", "report.csv", "study.md"):
        if (p.out / name).is_file():
            uploads.send(client, rid, p.out / name)
    plots = p.out / "plots"
    files = sorted(f for f in plots.rglob("*.png")) if plots.is_dir() else []
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda f: uploads.send(client, rid, f, f.parent.relative_to(p.out).as_posix()), files))
    summary = p.out / "summary"
    if summary.is_dir():  # the report's key figures as metrics, for the chart and compare views
        metrics: dict[str, float] = {}
        for f in sorted(summary.glob("*.json")):
            _flatten(json.loads(f.read_text()), f.stem, metrics)
        if metrics:
            from mlflow.entities import Metric


            log_metrics(client, rid, [Metric(k, v, 0, 0) for k, v in metrics.items()])
    client.set_terminated(rid, "FINISHED")
    return rid


def _flatten(node, key: str, out: dict[str, float]) -> None:
    """``{"student": {"a-b": {"best": 1.0}}}`` under ``kd`` -> ``kd.student.a-b.best``: 1.0."""
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{key}.{k}", out)
    elif isinstance(node, (int, float)) and not isinstance(node, bool) and len(key) <= 250:
        out[key] = float(node)


# -- the report stage ------------------------------------------------------------------------
def summarize_parents(p: Preset, figures: list[str],
                      group_metrics: Mapping[tuple[str, str, str], Mapping[str, float]] | None = None) -> int:
    """Log on every parent run the mean and std over its finished children of each figure
    (``best_top1`` -> ``best_top1_mean``, ``best_top1_std``, and ``n_seeds``), the report's figures
    of its group (``group_metrics``: (recipe, pair, variant) -> metrics, the paired comparisons), and
    mark it FINISHED, spanning its children's time (``_restart``). Returns how many parents were
    updated. A store that was never set up (no DAG ran with tracking) is left alone."""
    from mlflow.entities import Metric


    found = existing_experiment(grid_experiment(p))
    if found is None:
        return 0
    client, exp_id = found
    parents = _all_runs(client, exp_id, f"tags.{KIND_TAG} = 'seeds' and tags.preset = '{p.preset}'")
    # Every child in one paged query, grouped here: a query per parent made the report on the
    # cifar100 grid (178 parents) wait on the server for 6 s of its run.
    everyone: dict[str, list] = {}
    for c in _all_runs(client, exp_id, f"tags.{KIND_TAG} = 'train'"):
        if PARENT_TAG in c.data.tags:
            everyone.setdefault(c.data.tags[PARENT_TAG], []).append(c)
    children = {pid: [c for c in kids if c.info.status == "FINISHED"] for pid, kids in everyone.items()}

    def metrics_of(parent) -> list[Metric]:
        kids = children.get(parent.info.run_id, [])
        metrics = [Metric("n_seeds", float(len(kids)), 0, 0)]
        cost = [c.data.metrics["device_seconds"] for c in kids if "device_seconds" in c.data.metrics]
        if cost:  # the group's cost: its seeds' device-seconds, summed
            metrics.append(Metric("device_seconds", float(sum(cost)), 0, 0))
        for f in figures:
            values = [c.data.metrics[f] for c in kids if f in c.data.metrics]
            if values:
                metrics.append(Metric(f"{f}_mean", statistics.fmean(values), 0, 0))
                metrics.append(Metric(f"{f}_std", statistics.stdev(values) if len(values) > 1 else 0.0, 0, 0))
        tags = parent.data.tags
        group = (tags.get("recipe", ""), tags.get("pair", ""), tags.get("variant", ""))
        return metrics + [Metric(k, float(v), 0, 0) for k, v in (group_metrics or {}).get(group, {}).items()]

    def update(parent) -> None:
        # The parent's duration in the UI is its children's span, not the DAG's (it was made at the
        # DAG's start and is finished by the report).
        kids = everyone[parent.info.run_id]
        start = min(c.info.start_time for c in kids)
        end = max(c.info.end_time or 0 for c in kids) or None
        rid = parent.info.run_id if parent.info.start_time == start else _restart(client, exp_id, parent, start, kids)
        client.log_batch(rid, metrics=metrics_of(parent))
        client.set_terminated(rid, "FINISHED", end_time=end)

    todo = [q for q in parents if children.get(q.info.run_id)]
    # Two requests per parent, each mostly a wait on the server: a few at once (the server has workers).
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(update, todo))  # list(): the first error is raised here
    return len(todo)


def _restart(client: MlflowClient, exp_id: str, parent, start: int, kids: list) -> str:
    """MLflow cannot move a run's start: the parent is made again, with its tags, starting when its
    first child did; its children move under it and the old one is deleted (jobs find a parent by
    its tags among the active runs). Returns the new parent's id."""
    rid = client.create_run(exp_id, start_time=start, run_name=parent.info.run_name,
                            tags=dict(parent.data.tags)).info.run_id
    for c in kids:
        client.set_tag(c.info.run_id, PARENT_TAG, rid)
    client.delete_run(parent.info.run_id)
    return rid


def _all_runs(client: MlflowClient, exp_id: str, query: str) -> list:
    """Every run of the experiment that ``query`` selects, page by page."""
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], query, max_results=5000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def grid_experiment(p: Preset) -> str:
    return experiment_name(p)


def summarize_after_report(p: Preset,
                           group_metrics: Mapping[tuple[str, str, str], Mapping[str, float]] | None = None) -> None:
    """``tskd report``'s one line: the parents' mean ± std and their group's figures from the report
    (``summarize_parents``), without failing the report when the store cannot be reached (the
    tables are the report's result; MLflow is a view of it)."""
    task = task_of(p.dataset.name)
    figures = [f"{w}_{f}" for w in ("best", "last") for f in task.figures]
    try:  # first what runs recorded while the store was away: their parents' figures need them
        synced = sync_dirs(grid_dirs(p))
    except Exception as e:
        log.warning("MLflow: the runs' waiting records were not logged: %s", e)
    else:
        if synced["applied"] or synced["pending"]:
            log.log(logging.WARNING if synced["pending"] else logging.INFO,
                    "MLflow: %d waiting records logged, %d still wait (`tskd sync` once the store answers)",
                    synced["applied"], synced["pending"])
    try:
        n = summarize_parents(p, figures, group_metrics)
    except Exception as e:  # an unreachable server, a locked file: the report stands without it
        log.warning("MLflow: the parent runs' mean and std were not updated: %s", e)
        return
    if n:
        log.info("MLflow: %d parent runs carry their seeds' mean and std and the paired comparisons", n)
    try:
        n = log_run_grids(p)
    except Exception as e:
        log.warning("MLflow: the runs' evolution grids were not logged: %s", e)
        return
    if n:
        log.info("MLflow: %d runs carry their feature-map evolution grid", n)
    try:
        n, summary = log_report(p)
    except Exception as e:
        log.warning("MLflow: the report and its plots were not logged: %s", e)
        return
    if summary:
        log.info("MLflow: %d parent runs carry their group's plots; run %s carries the report and every plot",
                 n, summary)


def log_report(p: Preset) -> tuple[int, str | None]:
    """Each parent's group plots, and the summary run with the report (``log_parent_plots``, ``log_summary``)."""
    found = existing_experiment(grid_experiment(p))
    if found is None:
        return 0, None
    client, exp_id = found
    parents = _all_runs(client, exp_id, f"tags.{KIND_TAG} = 'seeds' and tags.preset = '{p.preset}'")
    uploads = Uploads(p, tracking_uri())
    try:
        return log_parent_plots(p, client, parents, uploads), log_summary(p, client, exp_id, uploads)
    finally:
        uploads.save()  # what was sent, also when a later upload failed


def log_run_grids(p: Preset) -> int:
    """Log each run's own figure of the report (TSKD's feature-map evolution grid) on that run, under
    ``plots/``: the run's page then shows the picture drawn from its evolution.npz. The run is the
    one its directory's mlflow_run.json names; a run without one (tracking off) is skipped. Logging
    again replaces the file. Returns how many runs got their grid."""
    grids = [(job, png) for job, png in evolution_grids(p) if png.is_file()]
    found = existing_experiment(grid_experiment(p)) if grids else None
    if found is None:
        return 0
    client, _ = found
    logged = 0
    for job, png in grids:
        run_file = student_dir(p, job) / "mlflow_run.json"
        try:
            run_id = json.loads(run_file.read_text())["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        client.log_artifact(run_id, str(png), "plots")
        logged += 1
    return logged
