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

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import submitit
import yaml
from pydantic import Field, ValidationError, model_validator

from tskd.config import ParamsError, Strict
from tskd.grid import RunSpec

Backend = Literal["slurm", "local", "inline"]
RuleName = Literal["teacher", "student"]

# sbatch flags that submitit or another key of the file already sets: a second, raw value in
# additional_parameters would silently win over (or break) it.
_MANAGED = {"time": "timeout_min", "partition": "partition", "account": "account", "nodes": "nodes",
            "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
            "gpus-per-node": "gpus_per_node", "job-name": None, "output": None, "error": None,
            "signal": None, "open-mode": None, "array": None}
# sacct states after which a job never runs again (PREEMPTED usually means "requeued", see _wait_slurm)
_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE", "REVOKED", "SPECIAL_EXIT")
_PREEMPTED_FINAL_S = 120  # PREEMPTED for this long without a requeue: the job is over
_RESULT_GRACE_S = 15  # a shared filesystem may show the result file late (submitit waits as long)
# Snakemake sets these to the rule's threads (0 for a waiting training rule under the profile)
# and sbatch exports them into the job; the job sets them to the CPUs it was given instead.
_THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_STARTED = re.compile(r"^tskd-job: .* started ([0-9.]+) s after submission", re.M)


class LaunchError(RuntimeError):
    """A job could not be submitted, or it failed; the message names the job and its log."""


# -- settings -------------------------------------------------------------------------------
class Resources(Strict):
    """What one job asks for; the names are submitit's (and map onto sbatch flags)."""

    partition: str | None = Field(None, description="SLURM partition (None: the cluster's default)")
    account: str | None = Field(None, description="account charged for the job (sbatch --account)")
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0, description="memory per node (None: the cluster's default)")
    timeout_min: int = Field(60, ge=1, description="time limit; the job is requeued when it is reached")
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1, description="> 1: one data-parallel rank per task")
    additional_parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="any other sbatch long option, without the dashes")
    setup: list[str] = Field(default_factory=list, description="shell lines run in the job before the call")

    @model_validator(mode="after")
    def _no_managed_flags(self):
        for key in self.additional_parameters:
            flag = key.replace("_", "-")
            if flag in _MANAGED:
                how = f"use the `{_MANAGED[flag]}` key" if _MANAGED[flag] else "submitit sets it"
                raise ValueError(f"additional_parameters.{key}: not allowed here ({how})")
        return self


class LaunchFile(Strict):
    """``slurm/launch.yaml``: the backend, resources for every training rule, per-rule overrides."""

    backend: Backend = "slurm"
    poll_s: float = Field(10.0, gt=0, description="how often a waiting rule asks sacct for its job's state")
    max_num_timeout: int = Field(3, ge=0, description="how many times a job that hits its time limit is requeued")
    defaults: Resources = Resources()
    rules: dict[RuleName, Resources] = Field(default_factory=dict)


class LaunchSettings(Strict):
    """The resolved settings of one rule: what ``launch`` needs."""

    backend: Backend = "inline"
    poll_s: float = Field(10.0, gt=0)
    max_num_timeout: int = Field(3, ge=0)
    resources: Resources = Resources()
    source: str = "<launch settings>"  # the file, for messages
    rule: str | None = None
    overridden: frozenset[str] = frozenset()  # resource keys set under rules.<rule>

    def where(self, key: str) -> str:
        """``file: rules.student.partition`` (or ``defaults.partition``): where a value was set."""
        section = f"rules.{self.rule}" if key in self.overridden else "defaults"
        return f"{self.source}: {section}.{key}"


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid launch settings"]
    for err in e.errors():
        loc = [str(x) for x in err["loc"] if x != "[key]"]
        if err["type"] == "extra_forbidden":
            model = Resources if len(loc) > 1 else LaunchFile
            msg = f"unknown key; allowed: {', '.join(model.model_fields)}"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_launch_file(path: str | Path) -> LaunchFile:
    """Read and validate a launch file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: launch settings file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    try:
        return LaunchFile.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, str(path))) from None


def resolve(file: LaunchFile, rule: str, source: str = "<launch file>") -> LaunchSettings:
    """The settings of ``rule``: ``defaults`` with the keys set under ``rules.<rule>`` replaced
    (``additional_parameters`` are merged, the rule's winning)."""
    override = file.rules.get(rule)  # type: ignore[call-overload]
    res, keys = file.defaults, frozenset()
    if override is not None:
        keys = frozenset(override.model_fields_set)
        update = {k: getattr(override, k) for k in keys}
        if "additional_parameters" in update:
            update["additional_parameters"] = res.additional_parameters | update["additional_parameters"]
        res = Resources.model_validate(res.model_dump() | update)
    settings = LaunchSettings(backend=file.backend, poll_s=file.poll_s, max_num_timeout=file.max_num_timeout,
                              resources=res, source=source, rule=rule, overridden=keys)
    if settings.backend == "inline" and res.nodes * res.tasks_per_node > 1:
        raise ParamsError(f"{settings.where('tasks_per_node')}: backend inline runs one process; "
                          "use backend local or slurm for several tasks")
    if settings.backend == "local" and res.nodes > 1:
        raise ParamsError(f"{settings.where('nodes')}: backend local runs on this machine only (nodes: 1)")
    return settings


def load_settings(path: str | Path, rule: str) -> LaunchSettings:
    """The settings of ``rule`` in the launch file at ``path``."""
    return resolve(load_launch_file(path), rule, str(path))


# -- checks against the cluster, before submitting ----------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`{' '.join(cmd)}` failed: {e}") from None
    if r.returncode != 0:
        raise LaunchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout


def cluster_partitions() -> list[str]:
    """Partition names, as ``sinfo`` lists them (the default one without its ``*``)."""
    return sorted({p.strip().rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split() if p.strip()})


@lru_cache(maxsize=1)
def sbatch_options() -> frozenset[str]:
    """The long options this cluster's ``sbatch`` knows (from ``sbatch --help``)."""
    return frozenset(re.findall(r"--([A-Za-z0-9][A-Za-z0-9-]*)", _run(["sbatch", "--help"])))


def check_cluster(settings: LaunchSettings) -> None:
    """Fail before submission on what sbatch would refuse or submitit would get wrong."""
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        raise LaunchError(f"{settings.source}: backend slurm needs the SLURM client tools (sbatch, sacct) "
                          "on PATH; use backend local to run without a cluster")
    r = settings.resources
    if r.partition is not None:
        known = cluster_partitions()
        if r.partition not in known:
            raise LaunchError(f"{settings.where('partition')}: unknown partition {r.partition!r}; "
                              f"this cluster has: {', '.join(known)}")
    unknown = sorted(k for k in r.additional_parameters if k.replace("_", "-") not in sbatch_options())
    if unknown:
        raise LaunchError(f"{settings.where('additional_parameters')}: {', '.join(unknown)}: not sbatch "
                          "option(s) (see `sbatch --help`)")


# -- the job ----------------------------------------------------------------------------------
def run_verb(verb: str, spec: RunSpec, options: dict[str, Any]) -> Any:
    """Run one call in this process: ``train`` or ``import-teacher``."""
    if verb == "train":
        from tskd.engine.trainer import train

        return train(spec, track=options.get("track", True))
    if verb == "import-teacher":
        from tskd.engine.eval_run import import_teacher

        return import_teacher(spec, Path(options["checkpoint"]))
    raise ValueError(f"unknown verb {verb!r}")


class RunJob(submitit.helpers.Checkpointable):
    """What a submitted job runs: one ``run_verb`` call.

    Checkpointable: when SLURM preempts the job or its time limit nears, submitit calls
    ``checkpoint`` and requeues the same call. That is all a resume needs, because the
    trainer checkpoints every epoch into ``out_dir`` and resumes from there by itself.
    """

    def __init__(self, verb: str, spec: dict[str, Any], options: dict[str, Any], submitted_at: float,
                 cpus: int = 1):
        self.verb, self.spec, self.options, self.submitted_at = verb, spec, options, submitted_at
        self.cpus = cpus
        self.package = _package_dir()

    def __call__(self) -> Any:
        _log_to_stderr()
        os.environ.update(dict.fromkeys(_THREAD_VARS, str(self.cpus)))  # before torch is imported
        env = submitit.JobEnvironment()
        print(f"tskd-job: {self.verb} {self.spec['out_dir']} as {env} started "
              f"{time.time() - self.submitted_at:.2f} s after submission", flush=True)
        if _package_dir() != self.package:
            # The job starts in the submitting directory, whose tskd comes first on sys.path.
            print(f"tskd-job: WARNING: this job runs the tskd package in {_package_dir()}, but it was "
                  f"submitted with the one in {self.package}: run Snakemake from the installed checkout "
                  "(pip install -e .)", file=sys.stderr, flush=True)
        if env.num_tasks > 1:
            _export_rank_env()
        return run_verb(self.verb, RunSpec.model_validate(self.spec), self.options)


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def _log_to_stderr() -> None:
    # The trainer's progress ("resuming ...", one line per epoch) into the job's log, as
    # `tskd train` shows it; only tskd's loggers: submitit's already write to stdout.
    log = logging.getLogger("tskd")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _export_rank_env() -> None:
    """This task as one rank: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the trainer's
    ``env://`` process group (submitit's TorchDistributedEnvironment), and one GPU per rank."""
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                     overwrite=True)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) > 1:  # the job sees all its GPUs (SLURM bound none per task): take this rank's
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[dist_env.local_rank % len(visible)]


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
    return f"tskd-{spec.method}-{pair}-seed{spec.seed}"


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
        return run_verb(verb, spec, options)
    r = settings.resources
    # Only training runs as several ranks; importing a teacher file is one process's work.
    tasks = r.tasks_per_node if verb == "train" else 1
    if verb != "train" and r.nodes > 1:
        settings = settings.model_copy(update={"resources": r.model_copy(update={"nodes": 1})})
    if settings.backend == "slurm":
        check_cluster(settings)
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
    _print(f"tskd: {verb} {spec.out_dir}: submitted {kind} job {job.job_id} "
           f"({_describe(settings, tasks)})\n  job log: {_paths(job)[1]}\n  job stdout: {_paths(job)[0]}")
    with _cancel_on_interrupt(job, kind):
        state = _wait_slurm(job, settings, t_submit) if settings.backend == "slurm" else _wait_local(job)
    value = _result(job, kind, state)
    _print(_summary(job, kind, state, t_submit))
    return value


def _describe(settings: LaunchSettings, tasks: int) -> str:
    r = settings.resources
    return (f"partition {r.partition or '(default)'}, {r.nodes} node(s) x {tasks} task(s), "
            f"{r.cpus_per_task} CPU(s)/task, {r.gpus_per_node} GPU(s)/node, "
            f"{f'{r.mem_gb:g} GB' if r.mem_gb else 'default memory'}, time limit {r.timeout_min} min")


def _print(msg: str) -> None:
    print(msg, flush=True)  # stdout: the rule's log file


def _paths(job: submitit.Job, task: int = 0) -> tuple[Path, Path]:
    p = job.task(task).paths
    return p.stdout, p.stderr


@contextmanager
def _cancel_on_interrupt(job: submitit.Job, kind: str) -> Iterator[None]:
    """While waiting: Ctrl-C or SIGTERM (Snakemake stopping) cancels the job instead of orphaning it."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        job.cancel(check=False)
        _print(f"tskd: interrupted; cancelled {kind} job {job.job_id}")
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sacct_row(job_id: str, fields: str = "State,ExitCode,Submit,Start,End") -> dict[str, str]:
    """The job's accounting record (``sacct -X``); empty until sacct knows the job (it lags)."""
    try:
        r = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []
    return dict(zip(fields.split(","), lines[-1].split("|"), strict=False)) if lines else {}


def _results_written(job: submitit.Job) -> bool:
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def _wait_slurm(job: submitit.Job, settings: LaunchSettings, t_submit: float) -> str:
    """Wait until every task wrote its result or sacct says the job is over; return the state.

    Polls sacct itself every ``poll_s`` (submitit's own watcher backs off to minutes, so a
    job killed from outside would be noticed late) and reads the result files every second.
    """
    last, next_poll, preempted_since = "", 0.0, None
    while True:
        if _results_written(job):
            return "COMPLETED"
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + settings.poll_s
            # Not in sacct yet: it lags a job's start by a few seconds.
            state = (sacct_row(job.job_id).get("State") or "SUBMITTED").split()[0]
            if state != last:
                _print(f"tskd: SLURM job {job.job_id}: {state} ({now - t_submit:.1f} s after submission)")
                last = state
            if state.startswith(_FINAL):
                return state
            # Preemption normally requeues (state goes back to PENDING); one that stays is final.
            preempted_since = (preempted_since or now) if state == "PREEMPTED" else None
            if preempted_since is not None and now - preempted_since > _PREEMPTED_FINAL_S:
                return state
        time.sleep(1.0)


def _wait_local(job: submitit.Job) -> str:
    while not job.done():
        time.sleep(0.5)
    return "FINISHED"


def _result(job: submitit.Job, kind: str, state: str) -> Any:
    """Task 0's return value; LaunchError with the job id, its log and what went wrong otherwise."""
    grace = 2 if state.startswith("CANCELLED") else _RESULT_GRACE_S
    deadline = time.monotonic() + grace
    while not _results_written(job) and time.monotonic() < deadline:
        time.sleep(0.5)
    values, failures = [], []
    for i in range(job.num_tasks):
        path = job.task(i).paths.result_pickle
        if not path.exists():
            failures.append((i, None))
            continue
        outcome, value = submitit.core.utils.pickle_load(path)
        if outcome == "success":
            values.append(value)
        else:
            failures.append((i, value))
    if failures:
        raise LaunchError(_failure_message(job, kind, state, failures))
    return values[0]


def _tail(text: str, n: int = 25) -> str:
    return "\n".join("    " + ln for ln in text.rstrip().splitlines()[-n:])


def _failure_message(job: submitit.Job, kind: str, state: str, failures: list[tuple[int, str | None]]) -> str:
    """First line: the job id and what happened; then each failed task's log paths and the
    end of its traceback (the call raised) or of its log (it died without a result)."""
    raised = [(task, trace) for task, trace in failures if trace]
    if raised:
        # The error itself, e.g. "tskd.engine.trainer.TrainingError: ...: loss is nan at epoch 0"
        what = raised[0][1].rstrip().splitlines()[-1]
    else:
        info = sacct_row(job.job_id) if kind == "SLURM" else {}
        exit_code = f", exit code {info['ExitCode']}" if info.get("ExitCode") else ""
        what = f"no result (state {info.get('State') or state}{exit_code}): killed, cancelled or crashed"
    lines = [f"{kind} job {job.job_id} failed: {what}"]
    for task, trace in failures:
        stdout, stderr = _paths(job, task)
        lines += [f"  job log: {stderr}", f"  job stdout: {stdout}"]
        log = trace or (stderr.read_text(errors="replace") if stderr.exists() else "")
        if log:
            lines += [f"  {'traceback' if trace else 'last lines of the log'} of task {task}:", _tail(log)]
    return "\n".join(lines)


def _summary(job: submitit.Job, kind: str, state: str, t_submit: float) -> str:
    stdout = _paths(job)[0]
    m = _STARTED.search(stdout.read_text(errors="replace")) if stdout.exists() else None
    started = f"started {float(m.group(1)):.2f} s after submission, " if m else ""
    return f"tskd: {kind} job {job.job_id} done: {started}{time.monotonic() - t_submit:.1f} s in all"
