"""Where a training call runs: in this process, in a local subprocess, or as a SLURM job.

``launch(spec, settings)`` is the one entry (``tskd train`` and ``tskd import-teacher`` call
it). Backends: ``inline`` (this process), ``local`` (submitit's local executor) and ``slurm``
(submitit). A submitted call is a ``RunJob``, a submitit ``Checkpointable``: on preemption or
time-out submitit requeues it, and the rerun resumes from the trainer's last checkpoint
(``<out_dir>/checkpoint.pt``, written every epoch). The caller waits for the job; it prints the
job id and log paths at once and fails with both, and the tail of the job's log, if the job
fails. The settings come from ``slurm/launch.yaml`` (see slurm/README.md); they are validated,
and checked against the cluster, before anything is submitted.

This module imports neither torch nor the engine: the waiting process stays light.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import submitit

from tskd.launch.gpus import claim_gpu_for_this_process
from tskd.launch.job import RunJob, run_verb
from tskd.launch.settings import (
    LaunchError,
    LaunchFile,
    LaunchSettings,
    Resources,
    check_cluster,
    load_launch_file,
    load_settings,
    resolve,
)
from tskd.launch.wait import cancel_on_interrupt, job_paths, job_result, say, summary, wait_local, wait_slurm
from tskd.spec.grid import RunSpec
from tskd.tracking.store import tracking_uri

__all__ = ["LaunchError", "LaunchFile", "LaunchSettings", "Resources", "RunJob", "launch", "load_launch_file",
           "load_settings", "resolve", "run_verb"]


def _executor(settings: LaunchSettings, folder: Path, name: str, tasks: int) -> submitit.Executor:
    r = settings.resources
    ex = submitit.AutoExecutor(folder, cluster=settings.backend,
                               **{f"{settings.backend}_max_num_timeout": settings.max_num_timeout})
    params: dict[str, Any] = dict(name=name, timeout_min=r.timeout_min, nodes=r.nodes, tasks_per_node=tasks,
                                  cpus_per_task=r.cpus_per_task, gpus_per_node=r.gpus_per_node, mem_gb=r.mem_gb)
    if settings.backend == "slurm":
        params |= dict(slurm_partition=r.partition, slurm_account=r.account,
                       slurm_additional_parameters=dict(r.additional_parameters), slurm_setup=list(r.setup))
        if r.nodes * tasks > 1:
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]  # a dead rank ends the job, not a hang
    elif r.setup:
        params["local_setup"] = list(r.setup)
    try:
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    except (ValueError, NameError, AssertionError) as e:
        raise LaunchError(f"{settings.source}: submitit refused the settings: {e}") from None
    return ex


def _job_name(spec: RunSpec) -> str:
    pair = f"{spec.teacher_arch}-{spec.arch}" if spec.teacher_arch else spec.arch
    recipe = f"-{spec.recipe_name}" if spec.recipe_name and spec.role == "student" else ""
    return f"tskd-{spec.variant or spec.method}-{pair}{recipe}-seed{spec.seed}"


def submission_folder(spec: RunSpec) -> Path:
    """A fresh folder per submission: job ids restart after a cluster reset, and an old
    result file must never be taken for a new job's."""
    return Path(spec.out_dir) / "slurm" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def launch(spec: RunSpec, settings: LaunchSettings | None = None, verb: str = "train", **options: Any) -> Any:
    """Run ``verb`` on ``spec`` where ``settings`` say; wait for it and return its result.

    Raises LaunchError (a RuntimeError) naming the job id and its log when a job fails, and
    ParamsError / LaunchError before submitting anything when the settings cannot work.
    """
    if settings is None or settings.backend == "inline":
        with claim_gpu_for_this_process():  # one GPU per in-process job on a multi-GPU workstation
            return run_verb(verb, spec, options)
    r = settings.resources
    # Only training runs as several ranks; importing a teacher file is one process's work.
    tasks = r.tasks_per_node if verb == "train" else 1
    if verb != "train" and r.nodes > 1:
        settings = settings.model_copy(update={"resources": r.model_copy(update={"nodes": 1})})
    if settings.backend == "slurm":
        check_cluster(settings)
        if verb == "train" and options.get("track", True):
            warn_sqlite_on_cluster()
    folder = submission_folder(spec)
    ex = _executor(settings, folder, _job_name(spec), tasks)
    call = RunJob(verb, spec.model_dump(mode="json"), options, submitted_at=time.time(), cpus=r.cpus_per_task)
    kind = "SLURM" if settings.backend == "slurm" else "local"
    try:
        with submitit.helpers.clean_env():  # no SLURM_* of an enclosing allocation leaks into the job
            job = ex.submit(call)
    except Exception as e:  # sbatch's refusal comes back as submitit's FailedJobError
        raise LaunchError(f"could not submit {verb} of {spec.out_dir} ({kind}; settings from "
                          f"{settings.source}): {e}") from None
    t_submit = time.monotonic()
    say(f"tskd: {verb} {spec.out_dir}: submitted {kind} job {job.job_id} "
           f"({_describe(settings, tasks)})\n  job log: {job_paths(job)[1]}\n  job stdout: {job_paths(job)[0]}")
    with cancel_on_interrupt(job, kind):
        state = wait_slurm(job, settings, t_submit) if settings.backend == "slurm" else wait_local(job)
    value = job_result(job, kind, state)
    say(summary(job, kind, state, t_submit))
    return value


def warn_sqlite_on_cluster() -> None:
    """Many SLURM jobs writing one SQLite file: its locks are unreliable on a network filesystem
    (NFS, Lustre), so runs can fail to log or lose records. Said in the rule's log, not refused:
    a single-node cluster on a local disk (the test cluster) works."""
    uri = tracking_uri()
    if uri.startswith("sqlite:"):
        say(f"tskd: WARNING: MLflow logs to {uri}, one SQLite file that every SLURM job writes; on a shared "
            "filesystem its locks are unreliable and runs may fail to log. Start a tracking server "
            "(bash slurm/mlflow-server.sh start) and export the MLFLOW_TRACKING_URI it prints.")


def _describe(settings: LaunchSettings, tasks: int) -> str:
    r = settings.resources
    return (f"partition {r.partition or '(default)'}, {r.nodes} node(s) x {tasks} task(s), "
            f"{r.cpus_per_task} CPU(s)/task, {r.gpus_per_node} GPU(s)/node, "
            f"{f'{r.mem_gb:g} GB' if r.mem_gb else 'default memory'}, time limit {r.timeout_min} min")
