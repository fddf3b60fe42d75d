"""How training runs look in MLflow's UI: names, tags, the parent run that groups a run's seeds,
the dataset input and the logged model. A run's journal (``tskd.tracking.journal``) writes one run;
this module decides what it carries, and sets the store up once for a whole grid (``prepare_store``).

Grouping: every (preset, recipe, pair, method) of the grid, and every teacher, has one *parent*
run (tag ``run_kind: seeds``) whose children are its seeds (tag ``mlflow.parentRunId``, which
the UI nests under the parent). The report stage (``tskd.reporting.publish.summarize_parents``) logs the children's
mean and std on the parent and marks it FINISHED.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
from typing import TYPE_CHECKING, Any

from tskd.io import atomic_write_json
from tskd.spec import grid
from tskd.tracking.store import EXPERIMENT_KIND, open_experiment, retry_locked, sqlite_path, tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from tskd.spec.config import Preset
    from tskd.spec.grid import RunSpec

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


# The papers' abbreviations. MLflow's runs table shows about 18 characters of a name: spelt out,
# a grid's names share their first 18 (kd:resnet32x4-ShuffleV1:...).
_ARCH_SHORT = (("resnet", "r"), ("ResNet", "R"), ("wrn_", "w"), ("Shuffle", "S"), ("MobileNet", "M"))


def short_arch(arch: str) -> str:
    """``resnet32x4`` -> ``r32x4``, ``wrn_40_2`` -> ``w40_2``, ``ShuffleV1`` -> ``SV1``, ``MobileNetV2`` -> ``MV2``."""
    long, short = next(((lg, sh) for lg, sh in _ARCH_SHORT if arch.startswith(lg)), ("", ""))
    return short + arch[len(long):]


def parent_name(spec: RunSpec) -> str:
    """A parent run's name: ``r20-r8 s kd`` (pair, recipe's initial, method), ``teacher r20``. What
    tells a grid's groups apart comes first, so that the name column's 18 characters differ: the
    pair, then the recipe's initial (a grid's student recipes differ there), then the method (its
    first letters differ). The spelt-out group is the ``group`` tag."""
    if spec.role == "teacher":
        return f"teacher {short_arch(spec.arch)}"
    pair = f"{short_arch(spec.teacher_arch)}-" if spec.teacher_arch else ""
    recipe = f" {spec.recipe_name[0]}" if spec.recipe_name else ""
    return f"{pair}{short_arch(spec.arch)}{recipe} {spec.variant or spec.method}"


def run_name(spec: RunSpec) -> str:
    """``seed0 r20-r8 s kd``, ``seed0 teacher r20``: the seed first, where the UI nests the seeds under
    their parent and cuts the rest of the name off."""
    return f"seed{spec.seed} {parent_name(spec)}"


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
    teachers = [grid.teacher_spec(p, a) for a in p.teachers if grid.published_teacher(p, a) is None]
    return teachers + [grid.student_spec(p, j) for j in grid.student_jobs(p)]


def prepare_store(p: Preset) -> dict[str, str]:
    """Once per DAG, before any job starts: the store's schema, the experiment and a parent run per
    group, so that a job's start only reads them (no lock, no schema check that writes). Returns
    {group: parent run id}. Idempotent: what exists is kept.

    Beside a SQLite store, a stamp (``mlflow.db.tskd-setup.json``) records what was set up for
    that very file (its inode): a later DAG run (every DVC stage runs one) then skips the set-up
    without importing MLflow."""
    specs = {group_name(s): s for s in grid_specs(p)}
    if not specs:
        return {}
    experiment = next(iter(specs.values())).experiment
    db = sqlite_path(tracking_uri())
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
            name = parent_name(spec)
            run = client.create_run(exp_id, run_name=name, tags=_parent_tags(spec) | standard_tags(spec) | {
                "mlflow.runName": name})
            # Not RUNNING: a DAG that fails before its report (which marks the parents FINISHED) must not
            # leave runs that claim to be running forever.
            client.update_run(run.info.run_id, status="SCHEDULED")
            existing[group] = run.info.run_id
        parents[group] = existing[group]
    if stamp:
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


def identity_counts(data: Any) -> dict[str, int]:
    """The dataset's sizes for the dataset input's profile."""
    out = {"train": len(data.train), "test": len(data.test)}
    if getattr(data, "val", None) is not None:
        out["val"] = len(data.val)
    return out
