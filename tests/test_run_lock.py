"""One writer per run directory, and `tskd status` telling a live job from a dead one, with real
training processes (a restarted Snakemake submits a run again while its first job still runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _train(spec, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tskd.cli", "--log", str(log), "train", "--no-track",
                             "--spec", spec.model_dump_json()], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"ended before {path} appeared: {proc.returncode} {proc.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (log.is_file() and text in log.read_text()):
        assert proc.poll() is None, f"ended before {log} said {text!r}: {proc.returncode}"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _results(*logs: Path) -> list[list[str]]:
    return [[line for line in log.read_text().splitlines() if ": best top-1" in line] for log in logs]


def test_a_second_job_on_a_running_run_waits_and_takes_its_result(make_spec, tmp_path):
    from tskd.engine.checkpoint import load_checkpoint

    # Enough epochs that the second process (its start-up imports torch) reaches the lock while the
    # first still trains, also on a loaded machine; the test checks that it did.
    epochs = 16
    spec = make_spec(recipe={"epochs": epochs, "milestones": []})
    out = Path(spec.out_dir)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _train(spec, first_log)
    _wait_for(out / "checkpoint.pt", first)
    second = _train(spec, second_log)
    _wait_for_line(second_log, "being written by another training process", first)
    # The second one waits while the first writes: the checkpoint moves on, epoch by epoch, from one writer.
    epochs_seen = set()
    while first.poll() is None:
        with contextlib.suppress(Exception):  # replaced between the check and the read
            epochs_seen.add(load_checkpoint(out / "checkpoint.pt")["epoch"])
        assert second.poll() is None
        time.sleep(0.1)
    assert first.returncode == 0
    assert second.wait(120) == 0
    log = second_log.read_text()
    assert "the process this one waited for" in log and "not trained again" in log
    assert "resuming" not in log and f"epoch 1/{epochs}" not in log  # it trained nothing
    assert max(epochs_seen) <= epochs - 1 and not list(out.glob("checkpoint*"))
    results = _results(first_log, second_log)
    assert results[0] == results[1] and len(results[0]) == 1  # the same result, printed by both


def test_a_job_started_after_its_twin_finished_takes_the_result(make_spec, tmp_path):
    """A restarted Snakemake's job that sat in SLURM's queue until the first one finished: it never
    meets the lock held, and still must not train the run again."""
    spec = make_spec(recipe={"epochs": 2, "milestones": []})
    out = Path(spec.out_dir)
    first = _train(spec, tmp_path / "first.log")
    assert first.wait(300) == 0
    model = (out / "model.pt").stat().st_mtime_ns
    second = _train(spec, tmp_path / "second.log")
    assert second.wait(300) == 0
    log = (tmp_path / "second.log").read_text()
    assert "an earlier process trained it to the end" in log and "epoch 1/2" not in log
    assert (out / "model.pt").stat().st_mtime_ns == model
    results = _results(tmp_path / "first.log", tmp_path / "second.log")
    assert results[0] == results[1] and len(results[0]) == 1
    # Other inputs in the same directory (another seed) are another run: trained, not taken.
    third = _train(make_spec(recipe={"epochs": 2, "milestones": []}, seed=1), tmp_path / "third.log")
    assert third.wait(300) == 0
    assert "epoch 1/2" in (tmp_path / "third.log").read_text()


def test_status_tells_a_job_killed_from_outside_from_a_running_one(make_spec, tmp_path):
    from tskd.workflow.status import format_status, job_status

    spec = make_spec(recipe={"epochs": 50, "milestones": []})
    out, log = Path(spec.out_dir), tmp_path / "job.log"
    proc = _train(spec, log)
    try:
        _wait_for(out / "checkpoint.pt", proc)
        s = job_status("job", out, log, 50)
        assert s.state == "running" and f"pid {proc.pid}" in s.writer, s
        assert f"pid {proc.pid}" in format_status([s])
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # as scancel -s KILL, an OOM kill or a dead node
        proc.wait()
    s = job_status("job", out, log, 50)
    assert s.state == "stopped" and s.epochs_done >= 1, s
    text = format_status([s])
    assert "1 stopped" in text and "no process writes it" in text, text
