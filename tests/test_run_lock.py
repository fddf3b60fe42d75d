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


def test_a_second_job_on_a_running_run_waits_and_takes_its_result(make_spec, tmp_path):
    from tskd.engine.checkpoint import load_checkpoint

    spec = make_spec(recipe={"epochs": 4, "milestones": []})
    out = Path(spec.out_dir)
    first = _train(spec, tmp_path / "first.log")
    _wait_for(out / "checkpoint.pt", first)
    second = _train(spec, tmp_path / "second.log")
    # The second one waits while the first writes: the checkpoint moves on, epoch by epoch, from one writer.
    epochs_seen = set()
    while first.poll() is None:
        with contextlib.suppress(Exception):  # replaced between the check and the read
            epochs_seen.add(load_checkpoint(out / "checkpoint.pt")["epoch"])
        assert second.poll() is None
        time.sleep(0.1)
    assert first.returncode == 0
    assert second.wait(120) == 0
    log = (tmp_path / "second.log").read_text()
    assert "being written by another training process" in log and "not trained again" in log
    assert "resuming" not in log and "epoch 1/4" not in log  # it trained nothing
    assert max(epochs_seen) <= 3 and not list(out.glob("checkpoint*"))
    results = [[line for line in (tmp_path / f"{w}.log").read_text().splitlines() if ": best top-1" in line]
               for w in ("first", "second")]
    assert results[0] == results[1] and len(results[0]) == 1  # the same result, printed by both


def test_status_tells_a_job_killed_from_outside_from_a_running_one(make_spec, tmp_path):
    from tskd.status import format_status, job_status

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
