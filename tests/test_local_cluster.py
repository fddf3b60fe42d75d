"""The single-node SLURM cluster of slurm/local-cluster.sh: jobs run, GPUs are accepted, and sacct
(which submitit polls) reports COMPLETED / FAILED / CANCELLED.

Run with ``pytest -s tests/test_local_cluster.py`` to see the timings.  The cluster is left running.
Set TSKD_SLURM_COLD_START=1 to stop it first and time a start from nothing (daemons stopped).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm_fixtures import cluster as _cluster
from tests.slurm_fixtures import report as _report

pytest_plugins = ["tests.slurm_fixtures"]  # the slurm_cluster fixture
JOB_TIMEOUT_S = 60


def _run(*args: str, timeout: float = 30) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed (rc={proc.returncode}): {proc.stdout}{proc.stderr}"
    return proc.stdout


def _sbatch(tmp_path: Path, *args: str) -> str:
    out = _run("sbatch", "--parsable", f"--chdir={tmp_path}", f"--output={tmp_path}/slurm-%j.out", *args)
    return out.strip().split(";")[0]


def _sacct_state(job_id: str) -> str:
    proc = subprocess.run(
        ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return ""
    lines = proc.stdout.split()
    return lines[0] if lines else ""


def _wait_sacct(job_id: str, want: tuple[str, ...], timeout: float = JOB_TIMEOUT_S) -> tuple[str, float]:
    """Poll sacct until the job's state starts with one of `want`; return (state, seconds waited)."""
    t0 = time.monotonic()
    state = ""
    while time.monotonic() - t0 < timeout:
        state = _sacct_state(job_id)
        if state.startswith(want):
            return state, time.monotonic() - t0
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: sacct state {state!r} after {timeout} s, wanted {want}")


def _wait_started(job_id: str, timeout: float = JOB_TIMEOUT_S) -> float:
    """Poll squeue until the job leaves PENDING; return seconds since this call."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        if out and out != "PENDING":
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still pending after {timeout} s")


def _seconds(ts: str) -> float:
    return time.mktime(time.strptime(ts, "%Y-%m-%dT%H:%M:%S"))


def test_status_exits_zero(slurm_cluster):
    proc, dt = _cluster("status", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "debug" in proc.stdout
    _report(f"status: {dt:.2f} s")


def test_batch_job_completes(slurm_cluster, tmp_path):
    job_id = _sbatch(tmp_path, "--wrap", "echo hi")
    state, dt = _wait_sacct(job_id, ("COMPLETED",))
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == "hi"
    _report(f"job {job_id}: submit -> sacct COMPLETED in {dt:.2f} s")


def test_a_job_leaves_pending_and_accounting_records_its_start(slurm_cluster, tmp_path):
    t_submit = time.monotonic()
    job_id = _sbatch(tmp_path, "--wrap", "sleep 2")
    latency = _wait_started(job_id)  # from sbatch returning to the job leaving PENDING
    total = time.monotonic() - t_submit
    _wait_sacct(job_id, ("COMPLETED",))
    submit, start = _run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "Submit,Start").strip().split("|")
    sacct_latency = _seconds(start) - _seconds(submit)
    _report(
        f"job {job_id}: submission-to-start {total:.2f} s incl. sbatch ({latency:.2f} s polling squeue); "
        f"sacct Start-Submit = {sacct_latency:.0f} s"
    )
    # A start time after the submission, recorded by accounting. How soon it starts is a measurement of
    # the machine's load (printed above), not something a test can hold a shared machine to.
    assert sacct_latency >= 0, (submit, start)


@pytest.mark.parametrize(
    "gpu_args",
    [("--gres=gpu:1",), ("--gpus=1",), ("--partition=gpu", "--gpus-per-node=1")],
    ids=["gres", "gpus", "gpu-partition"],
)
def test_gpu_job_accepted_and_runs(slurm_cluster, tmp_path, gpu_args):
    job_id = _sbatch(tmp_path, *gpu_args, "--wrap", "echo gpus=$CUDA_VISIBLE_DEVICES")
    _wait_sacct(job_id, ("COMPLETED",))
    assert (tmp_path / f"slurm-{job_id}.out").read_text().strip() == "gpus=0"
    tres = _run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "AllocTRES")
    assert "gres/gpu=1" in tres, tres


def test_failed_job_reports_failed(slurm_cluster, tmp_path):
    job_id = _sbatch(tmp_path, "--wrap", "exit 3")
    _wait_sacct(job_id, ("FAILED",))
    exit_code = _run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "ExitCode").strip()
    assert exit_code == "3:0", exit_code


def test_scancel_shows_cancelled(slurm_cluster, tmp_path):
    # trap '' TERM: like submitit jobs, ignore SIGTERM so KillWait matters
    job_id = _sbatch(tmp_path, "--wrap", "trap '' TERM; sleep 300")
    _wait_started(job_id)
    t0 = time.monotonic()
    _run("scancel", job_id)
    state, _ = _wait_sacct(job_id, ("CANCELLED",), timeout=30)
    dt = time.monotonic() - t0
    _report(f"job {job_id}: scancel -> sacct {state} in {dt:.2f} s")
    # and the node is free again for the next job (KillWait=5, not 30)
    t1 = time.monotonic()
    while time.monotonic() - t1 < 30:
        out = _run("squeue", "-h", "-j", job_id, "-o", "%T").strip()
        if out in ("", "CANCELLED", "COMPLETED"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"job {job_id} still {out!r} 30 s after scancel")
    _report(f"job {job_id}: scancel -> gone from the node in {time.monotonic() - t0:.2f} s")
