"""`tskd status`: a job's state, epoch and ETA read from the files a real (interrupted) run leaves."""

from __future__ import annotations

from pathlib import Path

from tskd.workflow.status import format_status, job_status


def test_a_run_with_a_checkpoint_is_running_with_its_epoch_and_eta(make_spec, tmp_path, one_thread):
    from tskd.engine.trainer import Trainer

    spec = make_spec(recipe={"epochs": 3, "milestones": []})
    out, log = Path(spec.out_dir), tmp_path / "job.log"
    assert job_status("job", out, log, 3).state == "waiting"

    # What a run killed after its first epoch leaves: the trainer's own checkpoint, 5 s per epoch.
    t = Trainer(spec, track=False)
    t.history.append({"epoch": 0, **t._train_epoch(0), **t._evaluate(), "seconds": 5.0})
    t._save(1)
    log.write_text("epoch 1/3 ...\n")
    s = job_status("job", out, log, 3)
    assert (s.state, s.epochs_done, s.eta_seconds) == ("running", 1, 10.0)
    text = format_status([s])
    assert "1 running" in text and "1/3" in text and "ETA 0:00:10" in text and str(log) in text, text
    assert (out / "checkpoint.pt").is_file()  # reading it changed nothing

    log.write_text("Traceback ...\ntskd train: failed: RuntimeError: shapes do not match\n")
    s = job_status("job", out, log, 3)
    assert s.state == "failed" and s.reason == "tskd train: failed: RuntimeError: shapes do not match"
    assert "failed: job: tskd train: failed: RuntimeError" in format_status([s])
