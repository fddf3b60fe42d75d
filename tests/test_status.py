"""`tskd status`: a job's state, epoch and ETA read from the files a real (interrupted) run leaves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kill import KillAt
from tskd.engine.events import Observer
from tskd.workflow.status import format_status, job_status

# What `tskd status` prints, asked from another process (a process's own POSIX lock is invisible to it).
_STATUS = """
import json, sys
from pathlib import Path
from tskd.workflow.status import format_status, job_status
s = job_status("job", Path(sys.argv[1]), Path(sys.argv[2]), 3)
print(json.dumps({"state": s.state, "epochs_done": s.epochs_done, "eta": s.eta_seconds, "text": format_status([s])}))
"""


class StatusInEpoch2(Observer):
    """At the end of epoch 2, while the run holds its directory: the checkpoint holds epoch 1."""

    name = "status"

    def __init__(self, log: Path) -> None:
        self.log, self.seen = log, None

    def on_epoch_end(self, run, epoch, row):
        if epoch == 1:
            self.log.write_text("epoch 1/3 ...\n")
            r = subprocess.run([sys.executable, "-c", _STATUS, str(run.out), str(self.log)], capture_output=True,
                               text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            self.seen = json.loads(r.stdout)


def test_a_run_with_a_checkpoint_is_running_with_its_epoch_and_eta(make_spec, tmp_path, one_thread):
    from tskd.engine.checkpoint import load_latest_checkpoint
    from tskd.engine.trainer import train

    spec = make_spec(recipe={"epochs": 3, "milestones": []})
    out, log = Path(spec.out_dir), tmp_path / "job.log"
    assert job_status("job", out, log, 3).state == "waiting"

    # While it trains: running, one epoch done, the ETA the mean epoch times the epochs left.
    status = StatusInEpoch2(log)
    with pytest.raises(KeyboardInterrupt):  # then killed in its third epoch
        train(spec, observers=[status, KillAt(2)])
    first = load_latest_checkpoint(out / "checkpoint.pt")["history"][0]["seconds"]
    seen = status.seen
    assert (seen["state"], seen["epochs_done"]) == ("running", 1)
    assert seen["eta"] == pytest.approx(2 * first)
    assert "1 running" in seen["text"] and "1/3" in seen["text"] and "ETA 0:00:" in seen["text"], seen["text"]
    assert str(log) in seen["text"]

    # Killed: nobody holds the directory; two epochs done, and reading it changed nothing.
    s = job_status("job", out, log, 3)
    assert (s.state, s.epochs_done) == ("stopped", 2)
    assert (out / "checkpoint.pt").is_file()

    log.write_text("Traceback ...\ntskd train: failed: RuntimeError: shapes do not match\n")
    s = job_status("job", out, log, 3)
    assert s.state == "failed" and s.reason == "tskd train: failed: RuntimeError: shapes do not match"
    assert "failed: job: tskd train: failed: RuntimeError" in format_status([s])
