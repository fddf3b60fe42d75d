"""How training runs look in MLflow's UI: names, tags, the parent run that groups a run's seeds,
the dataset input and the logged model. A run's journal (``tskd.tracking_journal``) writes one run;
this module decides what it carries, and sets the store up once for a whole grid (``prepare_store``).

Grouping: every (preset, recipe, pair, method) of the grid, and every teacher, has one *parent*
run (tag ``run_kind: seeds``) whose children are its seeds (tag ``mlflow.parentRunId``, which
the UI nests under the parent). ``summarize_parents`` (the report stage) logs the children's
mean and std on the parent and marks it FINISHED.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import statistics
import subprocess
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from tskd.config import Preset
    from tskd.grid import RunSpec

log = logging.getLogger("tskd.tracking")

KIND_TAG = "run_kind"  # "train": one training call; "seeds": the parent of a group's seeds
GROUP_TAG = "group"
PARENT_TAG = "mlflow.parentRunId"


def pair_label(spec: RunSpec) -> str:
    return f"{spec.teacher_arch}-{spec.arch}" if spec.teacher_arch else spec.arch


def group_name(spec: RunSpec) -> str:
    """What a researcher compares: a teacher architecture, or a method on a pair under a recipe."""
    if spec.role == "teacher":
        return f"teacher:{spec.arch}"
    # A variant is its own group (and parent run): its seeds are compared with each other.
    return f"{spec.variant or spec.method}:{pair_label(spec)}" + (f":{spec.recipe_name}" if spec.recipe_name else "")


def run_name(spec: RunSpec) -> str:
    """``teacher:resnet20:seed0``, ``kd:resnet20-resnet8:student:seed0``."""
    return f"{group_name(spec)}:seed{spec.seed}"


def git_state() -> dict[str, str]:
    """MLflow's git tags for the working directory's checkout; empty outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    # Tracked files only: results/ and mlflow.db are ignored or untracked and say nothing of the code.
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "mlflow.source.git.dirty": str(bool(dirty)).lower()}


def standard_tags(spec: RunSpec) -> dict[str, str]:
    """The tags MLflow's own fluent API would set (source, user, git) and the run's name."""
    git = git_state()
    return {"mlflow.runName": run_name(spec), "mlflow.source.name": f"tskd train ({spec.role})",
            # JOB: a batch job (SLURM); LOCAL: a process on this machine.
            "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL",
            "mlflow.user": _user(), "git_commit": git.get("mlflow.source.git.commit", "unknown"), **git}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_tags(spec: RunSpec, world_size: int, extra: dict[str, str]) -> dict[str, str]:
    """Every tag of a training run: what it is (filterable in the UI: ``tags.method = 'kd'``), where
    it ran, and the standard ones."""
    tags = {"preset": spec.preset, "dataset_family": spec.dataset.name, "role": spec.role, "method": spec.method,
            "variant": spec.variant or spec.method, "student": spec.arch, "teacher": spec.teacher_arch or "",
            "pair": pair_label(spec),
            "recipe": spec.recipe_name or "", "seed": str(spec.seed), "out_dir": spec.out_dir,
            KIND_TAG: "train", GROUP_TAG: group_name(spec)} | standard_tags(spec) | extra
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if world_size > 1:
        tags["world_size"] = str(world_size)
    return tags


# -- parents ---------------------------------------------------------------------------------
def _parent_filter(preset: str, group: str) -> str:
    return f"tags.{KIND_TAG} = 'seeds' and tags.preset = '{preset}' and tags.{GROUP_TAG} = '{group}'"


def find_parent_id(client: MlflowClient, exp_id: str, preset: str, group: str) -> str | None:
    """The parent run of a group (made by ``prepare_store``), or None (a run trained outside the DAG
    has none). Several (made by racing set-ups): the oldest, the same for every child."""
    runs = client.search_runs([exp_id], _parent_filter(preset, group), max_results=50,
                              order_by=["attributes.start_time ASC"])
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None


def _parent_tags(spec: RunSpec) -> dict[str, str]:
    return {"preset": spec.preset, "dataset_family": spec.dataset.name, "role": spec.role, "method": spec.method,
            "variant": spec.variant or spec.method, "student": spec.arch, "teacher": spec.teacher_arch or "",
            "pair": pair_label(spec),
            "recipe": spec.recipe_name or "", KIND_TAG: "seeds", GROUP_TAG: group_name(spec)}


def grid_specs(p: Preset) -> list[RunSpec]:
    """Every training run of the grid (imported teachers are not trained: no MLflow run)."""
    from tskd import grid

    teachers = [grid.teacher_spec(p, a) for a in p.teachers if grid.published_teacher(p, a) is None]
    return teachers + [grid.student_spec(p, j) for j in grid.student_jobs(p)]


def prepare_store(p: Preset) -> dict[str, str]:
    """Once per DAG, before any job starts: the store's schema, the experiment and a parent run per
    group, so that a job's start only reads them (no lock, no schema check that writes). Returns
    {group: parent run id}. Idempotent: what exists is kept.

    Beside a SQLite store, a stamp (``mlflow.db.tskd-setup.json``) records what was set up for
    that very file (its inode): a later DAG run (every DVC stage runs one) then skips the set-up
    without importing MLflow."""
    from tskd.tracking import EXPERIMENT_KIND, _sqlite_path, open_experiment, tracking_uri

    specs = {group_name(s): s for s in grid_specs(p)}
    if not specs:
        return {}
    experiment = next(iter(specs.values())).experiment
    db = _sqlite_path(tracking_uri())
    stamp = db.with_name(db.name + ".tskd-setup.json") if db else None
    if stamp and db.is_file() and stamp.is_file():
        try:
            done = json.loads(stamp.read_text())
        except (OSError, ValueError):
            done = {}
        if done.get("inode") == db.stat().st_ino and done.get("experiment") == experiment and \
                set(specs) <= set(done.get("parents", {})):
            return {g: done["parents"][g] for g in specs}

    client, exp_id = open_experiment(experiment)
    for key, value in EXPERIMENT_KIND.items():  # also on an experiment an earlier version made
        client.set_experiment_tag(exp_id, key, value)
    existing = {r.data.tags[GROUP_TAG]: r.info.run_id for r in client.search_runs(
        [exp_id], f"tags.{KIND_TAG} = 'seeds' and tags.preset = '{p.preset}'", max_results=5000,
        order_by=["attributes.start_time DESC"])}  # DESC: the oldest of duplicates wins, as in find_parent
    parents: dict[str, str] = {}
    # The UI lists runs newest first, a page at a time: the teachers' parents, made last, head the
    # table instead of sitting a dozen "Load more" clicks deep below a large grid's students.
    for group, spec in sorted(specs.items(), key=lambda gs: gs[1].role == "teacher"):
        if group not in existing:
            run = client.create_run(exp_id, run_name=group, tags=_parent_tags(spec) | standard_tags(spec) | {
                "mlflow.runName": group})
            # Not RUNNING: a DAG that fails before its report (which marks the parents FINISHED) must not
            # leave runs that claim to be running forever.
            client.update_run(run.info.run_id, status="SCHEDULED")
            existing[group] = run.info.run_id
        parents[group] = existing[group]
    if stamp:
        from tskd.io import atomic_write_json

        atomic_write_json(stamp, {"inode": db.stat().st_ino, "experiment": experiment, "parents": parents})
    return parents


# -- what a run records besides params and metrics ---------------------------------------------
def log_dataset(client: MlflowClient, run_id: str, name: str, identity: str, root: str | None,
                counts: dict[str, int]) -> None:
    """The run's input dataset (the UI's Dataset column): named as the data calls itself, its
    digest from the dataset's identity (official md5s or the manifest's sha256)."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from tskd.tracking import retry_locked

    # MLflow shows a short digest; the whole identity string stays in the run's params (data_identity).
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": root or ""}),
                 profile=json.dumps(counts | {"identity": identity}))
    inputs = [DatasetInput(ds, tags=[InputTag("mlflow.data.context", "train")])]
    # Jobs that start together insert the same dataset row (one per experiment, name and digest) at once:
    # the store refuses all but the first (a unique-key violation). The row is there by then, and a
    # second try only links this run to it.
    for attempt in range(3):
        try:
            return retry_locked(lambda: client.log_inputs(run_id, datasets=inputs))
        except Exception as e:
            if attempt == 2 or not _same_row_inserted(e):
                raise


def _same_row_inserted(e: Exception) -> bool:
    """A unique-key violation, as SQLite, MySQL/MariaDB and PostgreSQL word it."""
    text = str(e)
    return any(s in text for s in ("UNIQUE constraint failed", "Duplicate entry", "duplicate key value"))


def log_metrics(client: MlflowClient, run_id: str, metrics: list) -> None:
    """``metrics`` (MLflow Metric entities) in batches: MLflow takes at most 1,000 a request."""
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_model(client: MlflowClient, exp_id: str, run_id: str, name: str, artifact: str, step: int,
              tags: dict[str, str]) -> str:
    """The exported network as an MLflow 3 logged model linked to the run (the UI's Models column).
    Cheap: it holds no second copy of the weights; its ``model_file`` tag is the run's own
    ``model.pt`` artifact. Its page shows the run's params and final metrics: the params are copied
    onto it, and the latest value of each metric is logged again with the model's id (MLflow shows
    a model the metrics logged with its id). Sent with its own timestamp and step, the value is the
    same row of the run's history, now linked to the model: the history gains no point."""
    from mlflow.entities import LoggedModelOutput, Metric

    run = client.get_run(run_id)
    model = client.create_logged_model(exp_id, name=name, source_run_id=run_id, model_type="pytorch",
                                       tags=tags | {"model_file": f"{run.info.artifact_uri}/{artifact}"},
                                       params=dict(run.data.params))
    # RunData has no public accessor for the latest metrics with their timestamp and step.
    final = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id) for m in run.data._metric_objs]
    log_metrics(client, run_id, final)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


# -- the report stage ------------------------------------------------------------------------
def summarize_parents(p: Preset, figures: list[str],
                      group_metrics: Mapping[tuple[str, str, str], Mapping[str, float]] | None = None) -> int:
    """Log on every parent run the mean and std over its finished children of each figure
    (``best_top1`` -> ``best_top1_mean``, ``best_top1_std``, and ``n_seeds``), the report's figures
    of its group (``group_metrics``: (recipe, pair, variant) -> metrics, the paired comparisons), and
    mark it FINISHED. Returns how many parents were updated. A store that was never set up (no DAG
    ran with tracking) is left alone."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.entities import Metric

    from tskd.tracking import existing_experiment

    found = existing_experiment(grid_experiment(p))
    if found is None:
        return 0
    client, exp_id = found
    parents = _all_runs(client, exp_id, f"tags.{KIND_TAG} = 'seeds' and tags.preset = '{p.preset}'")
    # Every finished child in one paged query, grouped here: a query per parent made the report on
    # the cifar100 grid (178 parents) wait on the server for 6 s of its run.
    children: dict[str, list] = {}
    for c in _all_runs(client, exp_id, f"tags.{KIND_TAG} = 'train' and attributes.status = 'FINISHED'"):
        if PARENT_TAG in c.data.tags:
            children.setdefault(c.data.tags[PARENT_TAG], []).append(c)

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
        client.log_batch(parent.info.run_id, metrics=metrics_of(parent))
        client.set_terminated(parent.info.run_id, "FINISHED")

    todo = [q for q in parents if children.get(q.info.run_id)]
    # Two requests per parent, each mostly a wait on the server: a few at once (the server has workers).
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(update, todo))  # list(): the first error is raised here
    return len(todo)


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
    from tskd.grid import experiment_name

    return experiment_name(p)


def summarize_after_report(p: Preset,
                           group_metrics: Mapping[tuple[str, str, str], Mapping[str, float]] | None = None) -> None:
    """``tskd report``'s one line: the parents' mean ± std and their group's figures from the report
    (``summarize_parents``), without failing the report when the store cannot be reached (the
    tables are the report's result; MLflow is a view of it)."""
    from tskd.tasks import task_of
    from tskd.tracking_journal import grid_dirs, sync_dirs

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
    """Each parent's group plots, and the summary run with the report (tskd.tracking_report)."""
    from tskd.tracking import existing_experiment, tracking_uri
    from tskd.tracking_report import Uploads, log_parent_plots, log_summary

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
    from tskd.evolution import evolution_grids
    from tskd.grid import student_dir
    from tskd.tracking import existing_experiment

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


def identity_counts(data: Any) -> dict[str, int]:
    """The dataset's sizes for the dataset input's profile."""
    out = {"train": len(data.train), "test": len(data.test)}
    if getattr(data, "val", None) is not None:
        out["val"] = len(data.val)
    return out
