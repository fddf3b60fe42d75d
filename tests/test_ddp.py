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


def _vanilla(student):
    from tskd.distill import DistillContext, build_distiller
    from tskd.distill.registry import parse_method_params

    ctx = DistillContext(num_classes=100, image_size=(32, 32), epochs=1, num_train=55, train_labels=None)
    return build_distiller("vanilla", student, None, parse_method_params("vanilla", {}).model_dump(mode="json"), ctx)


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
        world = D.World(rank, world_size)
        model = D.sync_batchnorm(create_model("resnet8", num_classes=100), world, cuda=False)
        lo, hi = D.part_bounds(55, rank, world_size)
        # The trainer's step: the vanilla method in DDP, the loss scaled to the global batch's mean.
        step = D.train_step(_vanilla(model), world, torch.device("cpu"), every_parameter_every_step=True)
        assert isinstance(step, torch.nn.parallel.DistributedDataParallel)
        _, losses = step(x[lo:hi], y[lo:hi], 0)
        (sum(losses.values()) * D.loss_scale(world, hi - lo, 55)).backward()
        worst = max(float((p.grad - q.grad).norm() / q.grad.norm())
                    for p, q in zip(model.parameters(), single.parameters(), strict=True))
        stats = max(float((a - b).abs().max()) for a, b in zip(model.buffers(), single.buffers(), strict=True))
        if rank == 0:
            torch.save({"grad": worst, "buffers": stats}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_step_gradients_match_a_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "diff.pt"
    mp.spawn(_one_step, args=(2, 29571, str(out)), nprocs=2)
    diff = torch.load(out)
    assert diff["grad"] < 1e-4, diff
    assert diff["buffers"] < 1e-5, diff  # BatchNorm running statistics: global batch, as one process


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vanilla", "tskd"])
def test_two_local_tasks_train_like_one_process(make_spec, mlflow_uri, method):
    """With augmentation (each image's crop and flip is drawn from (epoch, image): the ranks draw
    what one process draws). TSKD: review epochs 1 and 3, whose forecasters sit out epochs 0 and 2
    (DDP finds them unused; their kept zero gradients go on decaying them)."""
    from mlflow.tracking import MlflowClient

    from tskd.engine.trainer import train
    from tskd.launch import LaunchSettings, Resources, launch

    recipe = {"epochs": 2, "batch_size": 55, "milestones": [1]}
    kw = {}
    if method == "tskd":
        teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
        train(teacher)
        recipe["epochs"] = 4
        kw = dict(method="tskd", teacher_arch="resnet8", teacher_path=str(Path(teacher.out_dir) / "model.pt"),
                  method_params={"delta": 1, "k": 1})
    one = train(make_spec(out="one", recipe=recipe, **kw))
    spec = make_spec(out="two", recipe=recipe, **kw)
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


def _crd_step(rank: int, world_size: int, port: int, out: str) -> None:
    """One CRD step of a 2-rank world and of one process: banks and Z after it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from tskd.distill import DistillContext, build_distiller
        from tskd.distill.registry import parse_method_params
        from tskd.models import create_model

        torch.set_num_threads(1)
        n_train, batch = 64, 23  # uneven parts (12 + 11)
        torch.manual_seed(0)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 4, (batch,))
        idx = torch.randperm(n_train)[:batch]
        ctx = DistillContext(num_classes=4, image_size=(32, 32), epochs=1, num_train=n_train,
                             train_labels=torch.arange(n_train) % 4)
        params = parse_method_params("crd", {"nce_k": 8}).model_dump(mode="json")

        def build(world):
            torch.manual_seed(1)
            student = D.sync_batchnorm(create_model("resnet8", num_classes=4), world, cuda=False)
            teacher = D.sync_batchnorm(create_model("resnet8", num_classes=4), world, cuda=False)
            return D.sync_batchnorm(build_distiller("crd", student, teacher, params, ctx), world, cuda=False)

        world = D.World(rank, world_size)
        d = build(world)
        d.train()
        lo, hi = D.part_bounds(batch, rank, world_size)
        d.forward_train(x[lo:hi], y[lo:hi], 0, indices=idx[lo:hi])
        banks = torch.cat([d.memory_s, d.memory_t], dim=1)
        gathered = [torch.empty_like(banks) for _ in range(world_size)]
        dist.all_gather(gathered, banks)
        zs = [torch.empty_like(d.z_norm) for _ in range(world_size)]
        dist.all_gather(zs, d.z_norm.clone())
        if rank == 0:
            dist.destroy_process_group()  # the single process runs outside the group
            one = build(D.SINGLE)
            one.train()
            one.forward_train(x, y, 0, indices=idx)
            single = torch.cat([one.memory_s, one.memory_t], dim=1)
            torch.save({"rank_banks": max(float((g - banks).abs().max()) for g in gathered),
                        "rank_z": max(float((z - d.z_norm).abs().max()) for z in zs),
                        "vs_single": float((banks - single).abs().max()),
                        "rows_changed": int((banks != _initial_banks(build)).any(1).sum())}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _initial_banks(build) -> torch.Tensor:
    fresh = build(D.SINGLE)
    return torch.cat([fresh.memory_s, fresh.memory_t], dim=1)


@pytest.mark.slow
def test_crd_banks_and_z_are_the_global_batchs_on_every_rank(tmp_path):
    """Each rank updates the memory banks with the whole global batch and fixes Z from the global
    batch's mean: the ranks' banks are identical, and equal to one process's (same embeddings,
    global-batch BatchNorm) to float rounding. The negatives are each rank's own draws."""
    import torch.multiprocessing as mp

    out = tmp_path / "crd.pt"
    mp.spawn(_crd_step, args=(2, 29577, str(out)), nprocs=2)
    diff = torch.load(out)
    assert diff["rank_banks"] == 0.0 and diff["rank_z"] == 0.0, diff
    assert diff["vs_single"] < 1e-5, diff
    assert diff["rows_changed"] == 23, diff  # every row of the global batch was updated


def _tskd_review_step(rank: int, world_size: int, port: int, out: str) -> None:
    """The gradients of one TSKD review step (snapshot forwards in train-mode BatchNorm) in a 2-rank
    world, summed over ranks, against one process's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from tskd.distill import DistillContext, build_distiller
        from tskd.distill.registry import parse_method_params
        from tskd.models import create_model

        torch.set_num_threads(1)
        torch.manual_seed(0)
        batch = 21
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 4, (batch,))
        ctx = DistillContext(num_classes=4, image_size=(32, 32), epochs=4, num_train=64, train_labels=None)
        params = parse_method_params("tskd", {"delta": 1, "k": 1}).model_dump(mode="json")

        def build(world):
            # As the trainer builds it: the networks converted before the method is built on them.
            torch.manual_seed(1)
            student = D.sync_batchnorm(create_model("resnet8", num_classes=4), world, cuda=False)
            teacher = D.sync_batchnorm(create_model("resnet8", num_classes=4), world, cuda=False)
            d = D.sync_batchnorm(build_distiller("tskd", student, teacher, params, ctx), world, cuda=False)
            d.train()
            d.on_epoch_end(0)  # the memory node: a snapshot of the student as initialised
            torch.manual_seed(2)
            with torch.no_grad():  # the student has trained since: its maps have moved (noise, not a
                for q in d.student.parameters():  # scaling, which train-mode BN and the maps' norm undo)
                    q.add_(0.1 * torch.randn_like(q))
            d.on_epoch_start(1)  # the review node
            return d

        world = D.World(rank, world_size)
        d = build(world)
        lo, hi = D.part_bounds(batch, rank, world_size)
        step = D.train_step(d, world, torch.device("cpu"), every_parameter_every_step=d.every_parameter_every_step)
        _, losses = step(x[lo:hi], y[lo:hi], 1)
        assert "review" in losses
        (sum(losses.values()) * D.loss_scale(world, hi - lo, batch)).backward()
        params_ = [p for p in d.trainable_parameters()]
        grads = [p.grad.clone() if p.grad is not None else None for p in params_]
        if rank == 0:
            dist.destroy_process_group()
            one = build(D.SINGLE)
            _, losses = one.forward_train(x, y, 1)
            sum(losses.values()).backward()
            names = {id(p): n for n, p in one.named_parameters()}
            diffs = {names.get(id(p), "?"): float((g - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
                     for g, p in zip(grads, one.trainable_parameters(), strict=True) if g is not None}
            torch.save({"grad": max(diffs.values()), "diffs": diffs}, out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_a_tskd_review_step_matches_a_single_process(tmp_path):
    """The snapshot forwards normalise with the global batch's statistics too (the student is
    converted before TSKD builds its snapshot forward on it), so 2 ranks take one process's step."""
    import torch.multiprocessing as mp

    out = tmp_path / "tskd.pt"
    mp.spawn(_tskd_review_step, args=(2, 29579, str(out)), nprocs=2)
    diff = torch.load(out)
    assert diff["grad"] < 1e-4, sorted(diff["diffs"].items(), key=lambda kv: -kv[1])[:5]
