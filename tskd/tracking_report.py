"""What the report puts on MLflow besides the parents' figures (tskd.tracking_runs.summarize_parents):
each parent run gets the plots of its group, and one summary run per preset carries the report itself
(report.md, a self-contained report.html, report.csv) and every plot, so that MLflow alone shows which
method wins and by how much more than seed noise."""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tskd.config import Preset
from tskd.io import atomic_write_json

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

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
    from tskd.plots import plot_files

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
    from tskd.tracking_runs import KIND_TAG

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

            from tskd.tracking_runs import log_metrics

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
