"""Data-parallel training (tskd.engine.distributed): two CPU processes (gloo) train as one.

Tolerances, and why: the ranks add partial sums in another order than one process does, so
results agree to float rounding, not bit for bit. One step's gradients agree to 1e-4
(relative); after two epochs of SGD with momentum the rounding has grown but stays small:
per-epoch losses agree to 1e-4 (relative), accuracies to one image, weights to 1e-2
(relative norm of the difference). BatchNorm uses global-batch statistics in both
(GlobalBatchNorm on CPU); without that the per-rank statistics alone differ by percents.
Augmentation is off: with it each rank draws its own crops and flips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tskd.engine import distributed as D
from tskd.engine.loaders import RunData


def _run_data(n: int) -> RunData:
    return RunData(train=TensorDataset(torch.arange(n)), val=None, test=TensorDataset(torch.arange(1)),
                   num_classes=1, image_size=(1, 1), train_labels=torch.zeros(n), identity="test", name="test",
                   normalization="none",
                   mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_parts_make_up_the_single_process_batches(world_size):
    data, batch = _run_data(23), 5

    def batches(world):
        loader = data.train_loader(batch, torch.Generator().manual_seed(7), 0, world)
        return [b[0].tolist() for b in loader]

    single = batches(D.SINGLE)
    parts = [batches(D.World(rank, world_size)) for rank in range(world_size)]
    assert [sum((p[i] for p in parts), []) for i in range(len(single))] == single
    assert all(len(p) == len(single) for p in parts)  # every rank takes part in every step
    assert [D.global_batch_size(i, batch, 23) for i in range(len(single))] == [len(b) for b in single]


def test_a_batch_smaller_than_the_world_is_refused():
    data = _run_data(11)  # batches of 5, 5, 1: the last cannot be cut in 2
    with pytest.raises(ValueError, match="batch of 1 images cannot be shared by 2 processes"):
        list(data.train_loader(5, torch.Generator().manual_seed(0), 0, D.World(0, 2)))


def _one_step(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from tskd.models import create_model

        torch.set_num_threads(1)
        torch.manual_seed(0)
        x, y = torch.randn(55, 3, 32, 32), torch.randint(0, 100, (55,))  # 55: uneven parts (28 + 27)
        torch.manual_seed(1)
        single = create_model("resnet8", num_classes=100)
        F.cross_entropy(single(x)[0], y).backward()
        torch.manual_seed(1)
        model = D.sync_batchnorm(create_model("resnet8", num_classes=100), D.World(rank, world_size), cuda=False)
        lo, hi = D.part_bounds(55, rank, world_size)
        (F.cross_entropy(model(x[lo:hi])[0], y[lo:hi]) * ((hi - lo) / 55)).backward()
        D.sum_gradients(list(model.parameters()))
        worst = max(float((p.grad - q.grad).norm() / q.grad.norm())
                    for p, q in zip(model.parameters(), single.parameters(), strict=True))
        stats = max(float((a - b).abs().max()) for a, b in zip(model.buffers(), single.buffers(), strict=True))
        if rank == 0:
            torch.save({"grad": worst, "buffers": stats}, out)
    finally:
        dist.destroy_process_group()


def test_one_step_gradients_match_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "diff.pt"
    mp.spawn(_one_step, args=(2, 29571, str(out)), nprocs=2)
    diff = torch.load(out)
    assert diff["grad"] < 1e-4, diff
    assert diff["buffers"] < 1e-5, diff  # BatchNorm running statistics: global batch, as one process


@pytest.mark.slow
def test_two_local_tasks_train_like_one_process(make_spec, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.launch import LaunchSettings, Resources, launch

    recipe = {"epochs": 2, "batch_size": 55, "milestones": [1], "augment": []}
    one = train(make_spec(out="one", recipe=recipe), track=False)
    spec = make_spec(out="two", recipe=recipe)
    # submitit's local executor: two processes, each a rank (TorchDistributedEnvironment)
    two = launch(spec, LaunchSettings(backend="local", resources=Resources(tasks_per_node=2, timeout_min=10)))

    for a, b in zip(one["history"], two["history"], strict=True):
        for key in ("train_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
        assert abs(b["train_top1"] - a["train_top1"]) <= 100 / 300 + 1e-9  # one of 300 images
        for key in ("test_top1", "test_top5"):
            assert abs(b[key] - a[key]) <= 100 / 200 + 1e-9  # one of 200 images
    wa = torch.load(Path(make_spec(out="one").out_dir) / "model.pt", weights_only=True)["model"]
    wb = torch.load(Path(spec.out_dir) / "model.pt", weights_only=True)["model"]
    keys = [k for k in wa if not k.endswith("num_batches_tracked")]
    va, vb = (torch.cat([w[k].double().flatten() for k in keys]) for w in (wa, wb))
    assert float((va - vb).norm() / va.norm()) < 1e-2

    # Only rank 0 tracked: one MLflow run, marked with the world size.
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("tskd-test").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
