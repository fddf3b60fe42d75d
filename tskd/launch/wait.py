"""Waiting for a submitted job: sacct polling, requeues, cancellation, and clear failures."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import submitit

from tskd.launch.settings import LaunchError, LaunchSettings

# sacct states after which a job never runs again (PREEMPTED usually means "requeued", see wait_slurm)
_FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
          "DEADLINE", "REVOKED", "SPECIAL_EXIT")
_PREEMPTED_FINAL_S = 120  # PREEMPTED for this long without a requeue: the job is over
# A job whose node fails is requeued by SLURM when it may be (JobRequeue=1, the default): sacct shows
# its run NODE_FAIL for a few seconds, then the requeued job PENDING, while the controller (squeue)
# queues it again at once. A NODE_FAIL taken for the end failed the waiting call of a job that was
# going to resume (the message then said "state PENDING"); the job is over only when squeue no longer
# has it in one of these states (tests/test_cluster_faults.py).
_QUEUED_AGAIN = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RUNNING", "SUSPENDED")
_RESULT_GRACE_S = 15  # a shared filesystem may show the result file late (submitit waits as long)
_STARTED = re.compile(r"^tskd-job: .* started ([0-9.]+) s after submission", re.M)


def say(msg: str) -> None:
    print(msg, flush=True)  # stdout: the rule's log file


def job_paths(job: submitit.Job, task: int = 0) -> tuple[Path, Path]:
    p = job.task(task).paths
    return p.stdout, p.stderr


@contextmanager
def cancel_on_interrupt(job: submitit.Job, kind: str) -> Iterator[None]:
    """While waiting: Ctrl-C or SIGTERM (Snakemake stopping) cancels the job instead of orphaning it."""
    main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        yield
    except KeyboardInterrupt:
        job.cancel(check=False)
        say(f"tskd: interrupted; cancelled {kind} job {job.job_id}")
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


def squeue_state(job_id: str) -> str:
    """The controller's state of the job (``squeue``); '' once it has forgotten the job, or when squeue fails."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.split()[0] if r.returncode == 0 and r.stdout.split() else ""


def _results_written(job: submitit.Job) -> bool:
    return all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks))


def wait_slurm(job: submitit.Job, settings: LaunchSettings, t_submit: float) -> str:
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
            changed = state != last
            if changed:
                say(f"tskd: SLURM job {job.job_id}: {state} ({now - t_submit:.1f} s after submission)")
                last = state
            if state == "NODE_FAIL" and (queued := squeue_state(job.job_id)) in _QUEUED_AGAIN:
                if changed:
                    say(f"tskd: SLURM job {job.job_id}: its node failed and SLURM requeued it ({queued}); "
                        "it resumes from its last checkpoint when it runs again")
            elif state.startswith(_FINAL):
                return state
            # Preemption normally requeues (state goes back to PENDING); one that stays is final.
            preempted_since = (preempted_since or now) if state == "PREEMPTED" else None
            if preempted_since is not None and now - preempted_since > _PREEMPTED_FINAL_S:
                return state
        time.sleep(1.0)


def wait_local(job: submitit.Job) -> str:
    while not job.done():
        time.sleep(0.5)
    return "FINISHED"


def job_result(job: submitit.Job, kind: str, state: str) -> Any:
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
        final = info.get("State") or state
        how = ("its node failed and SLURM did not requeue it; run it again to resume from its last checkpoint"
               if final == "NODE_FAIL" else "killed, cancelled or crashed")
        what = f"no result (state {final}{exit_code}): {how}"
    lines = [f"{kind} job {job.job_id} failed: {what}"]
    for task, trace in failures:
        stdout, stderr = job_paths(job, task)
        lines += [f"  job log: {stderr}", f"  job stdout: {stdout}"]
        log = trace or (stderr.read_text(errors="replace") if stderr.exists() else "")
        if log:
            lines += [f"  {'traceback' if trace else 'last lines of the log'} of task {task}:", _tail(log)]
    return "\n".join(lines)


def summary(job: submitit.Job, kind: str, state: str, t_submit: float) -> str:
    stdout = job_paths(job)[0]
    m = _STARTED.search(stdout.read_text(errors="replace")) if stdout.exists() else None
    started = f"started {float(m.group(1)):.2f} s after submission, " if m else ""
    return f"tskd: {kind} job {job.job_id} done: {started}{time.monotonic() - t_submit:.1f} s in all"
