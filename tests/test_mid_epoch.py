"""Checkpoints inside an epoch: a run killed mid-epoch resumes at the step it reached and ends with
the bits of an uninterrupted run (CPU); a NaN on one rank stops every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tskd.engine.trainer import train
from tskd.spec.config import TrainCfg


def _partial(path: Path) -> tuple[int, int]:
    """(epochs done, steps into the next) of the checkpoint at ``path``; (-1, -1) while there is none."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return -1, -1
    return state["epoch"], (state["partial"] or {}).get("step", 0)


def _history(m: dict) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in m["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["dataloader", "device"])
def test_a_run_killed_mid_epoch_resumes_to_the_same_bits(make_spec, tiny_cifar, loader):
    """CRD (random negatives every step, a memory bank, a Z fixed from the first batch) with
    augmentation: the data order, each image's crop and flip, the random streams and the epoch's
    running sums must all continue where the killed run stopped."""
    from tskd.spec.config import Cifar100Data

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    kw = dict(method="crd", teacher_arch="resnet8", teacher_path=str(Path(teacher.out_dir) / "model.pt"),
              dataset=Cifar100Data(root=str(tiny_cifar), loader=loader),
              # every check (every 2 steps) is a checkpoint: the kill lands mid-epoch
              train=TrainCfg(device="cpu", threads=1, checkpoint_minutes=1e-9, check_finite_every=2))
    recipe = {"epochs": 2, "batch_size": 10, "milestones": [1]}  # 30 steps per epoch
    ref = train(make_spec(out="ref", recipe=recipe, **kw))

    spec = make_spec(out="killed", recipe=recipe, **kw)
    out = Path(spec.out_dir)
    cmd = [sys.executable, "-m", "tskd.cli", "train", "--no-track", "--spec", spec.model_dump_json()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while _partial(out / "checkpoint.pt") < (1, 6):  # inside epoch 2, after the lr decay
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    epochs, step = _partial(out / "checkpoint.pt")
    assert epochs == 1 and 0 < step < 30, (epochs, step)

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "step" in r.stderr
    resumed = json.loads((out / "metrics.json").read_text())
    assert _history(resumed) == _history(ref)  # train sums of the split epoch included, to the last digit
    a = torch.load(Path(make_spec(out="ref").out_dir) / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loader_workers_change_nothing(make_spec, tiny_cifar):
    """Each image's crop and flip come from (epoch seed, image index), whichever process reads it:
    2 persistent worker processes give the bits of the main process, so num_workers is no part of a
    run's identity."""
    from tskd.spec.config import Cifar100Data

    runs = [train(make_spec(out=f"w{w}", dataset=Cifar100Data(root=str(tiny_cifar), num_workers=w),
                            recipe={"epochs": 2, "milestones": []})) for w in (0, 2)]
    assert _history(runs[0]) == _history(runs[1])
    assert make_spec(dataset=Cifar100Data(root=str(tiny_cifar), num_workers=0)).identity() == \
        make_spec(dataset=Cifar100Data(root=str(tiny_cifar), num_workers=3)).identity()


def test_checkpoint_settings_do_not_change_a_runs_identity(make_spec):
    a = make_spec(train=TrainCfg(device="cpu", checkpoint_minutes=1.0, check_finite_every=1))
    b = make_spec(train=TrainCfg(device="cpu", checkpoint_minutes=None, check_finite_every=50))
    assert a.identity() == b.identity()


def _nan_on_rank_one(rank: int, port: int, spec_json: str, out: str) -> None:
    from tskd.engine.distributed import World
    from tskd.engine.trainer import Trainer, TrainingError
    from tskd.spec.grid import RunSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        t = Trainer(RunSpec.model_validate_json(spec_json), world=World(rank, 2))
        forward, calls = t.distiller.forward_train, []

        def poisoned(*args, **kwargs):
            # Stands in for what makes one rank's loss NaN in practice (a bad image in its part).
            logits, losses = forward(*args, **kwargs)
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                losses["ce"] = losses["ce"] * float("nan")
            return logits, losses

        t.distiller.forward_train = poisoned
        try:
            t.run()
            result = "finished"
        except TrainingError as e:
            result = f"TrainingError: {e}"
        Path(out, f"rank{rank}.txt").write_text(result)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(make_spec, tmp_path):
    import torch.multiprocessing as mp

    spec = make_spec(recipe={"epochs": 2, "batch_size": 20, "augment": []},
                     train=TrainCfg(device="cpu", threads=1, check_finite_every=4))
    ctx = mp.spawn(_nan_on_rank_one, args=(29583, spec.model_dump_json(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.time() + 240
    while not ctx.join(timeout=1):  # without the agreement, rank 0 waits in the next all-reduce forever
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung after another rank's loss became NaN")
    verdicts = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert all(v.startswith("TrainingError") for v in verdicts), verdicts
    # The same check (steps 1-4, counted from 1; the NaN came at the third) stopped both.
    assert all("at epoch 1 one of steps 1-4 on one of 2 ranks" in v for v in verdicts), verdicts
