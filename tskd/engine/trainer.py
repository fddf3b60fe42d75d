"""The one training loop: every method, every dataset, teachers and students alike."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tskd.config import fingerprint
from tskd.distill import DistillContext, build_distiller
from tskd.engine import distributed
from tskd.engine.checkpoint import export_model, load_checkpoint, save_checkpoint
from tskd.engine.distributed import SINGLE, World
from tskd.engine.evaluate import evaluate
from tskd.engine.loaders import build_run_data
from tskd.engine.runtime import Runtime, seed_epoch, select_runtime, uses_cuda
from tskd.grid import RunSpec
from tskd.io import atomic_write_json
from tskd.models import create_model, model_entry

log = logging.getLogger("tskd.train")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


def lr_at(base_lr: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """Step decay: ``base_lr * gamma^(number of milestones <= epoch)`` (epochs 0-based)."""
    return base_lr * gamma ** sum(epoch >= m for m in milestones)


def _base_lr(spec: RunSpec) -> float:
    small = model_entry(spec.arch).small
    return spec.recipe.lr_small if (small and spec.recipe.lr_small) else spec.recipe.lr


def _load_teacher(spec: RunSpec, num_classes: int) -> torch.nn.Module | None:
    if spec.teacher_path is None:
        return None
    from tskd.models.published import load_published_checkpoint

    return load_published_checkpoint(Path(spec.teacher_path), spec.teacher_arch, num_classes=num_classes)


def _tracker(spec: RunSpec, run_id: str | None, world: World):
    from tskd.tracking import RunTracker, git_commit

    tags = {"preset": spec.preset, "dataset": spec.dataset.name, "role": spec.role, "method": spec.method,
            "student": spec.arch, "teacher": spec.teacher_arch or "", "seed": str(spec.seed),
            "git_commit": git_commit(), "out_dir": spec.out_dir}
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    if world.distributed:
        tags["world_size"] = str(world.size)
    name = f"{spec.method}:{spec.teacher_arch + '-' if spec.teacher_arch else ''}{spec.arch}:seed{spec.seed}"
    return RunTracker(spec.experiment, name, tags, spec.model_dump(mode="json"), run_id=run_id)


class Trainer:
    """Trains ``spec`` to completion, resuming from ``<out_dir>/checkpoint.pt`` if it matches.

    In a data-parallel run (``world.size > 1``, see ``tskd.engine.distributed``) every rank
    runs this same loop on its part of each batch; only rank 0 writes files and MLflow records.
    """

    def __init__(self, spec: RunSpec, *, track: bool = True, world: World = SINGLE):
        self.spec = spec
        self.out = Path(spec.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.track = track and world.main
        self.world = world
        self.rt: Runtime = select_runtime(spec.train)
        torch.use_deterministic_algorithms(spec.train.deterministic and self.rt.device.type == "cpu")
        self.data = build_run_data(spec.dataset, spec.recipe)
        torch.manual_seed(spec.seed)  # model initialisation
        student = create_model(spec.arch, num_classes=self.data.num_classes)
        teacher = _load_teacher(spec, self.data.num_classes)
        ctx = DistillContext(num_classes=self.data.num_classes, image_size=self.data.image_size,
                             epochs=spec.recipe.epochs, num_train=len(self.data.train),
                             train_labels=self.data.train_labels)
        distiller = build_distiller(spec.method, student, teacher, spec.method_params, ctx)
        # Global-batch BatchNorm statistics, so that N ranks train as one process would.
        self.distiller = distributed.sync_batchnorm(distiller, world, self.rt.device.type == "cuda")
        self.distiller.to(self.rt.device)
        self.base_lr = _base_lr(spec)
        r = spec.recipe
        self.optimizer = torch.optim.SGD(list(self.distiller.trainable_parameters()), lr=self.base_lr,
                                         momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay)
        self.key = fingerprint(spec.resume_key())
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.run_id: str | None = None
        self._resume()

    # -- resume -----------------------------------------------------------------------------
    def _resume(self) -> None:
        if not self.ckpt_path.exists():
            return
        state = load_checkpoint(self.ckpt_path)
        if state.get("key") != self.key:
            # The params changed since this checkpoint was written: it belongs to another run.
            log.warning("%s: written for other params; training from the start", self.ckpt_path)
            return
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"]
        self.history = state["history"]
        self.run_id = state.get("mlflow_run_id")
        log.info("resuming %s at epoch %d", self.out, self.start_epoch)

    def _save(self, epoch_done: int) -> None:
        if not self.world.main:
            return
        save_checkpoint(self.ckpt_path, {"key": self.key, "epoch": epoch_done, "history": self.history,
                                         "distiller": self.distiller.state_dict(),
                                         "optimizer": self.optimizer.state_dict(),
                                         "mlflow_run_id": self.run_id, "spec": self.spec.model_dump(mode="json")})

    # -- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        spec, d, dev = self.spec, self.distiller, self.rt.device
        lr = lr_at(self.base_lr, spec.recipe.milestones, spec.recipe.gamma, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        world, batch_size = self.world, spec.recipe.batch_size
        gen = seed_epoch(spec.seed, epoch, world.rank)
        loader = self.data.train_loader(batch_size, gen, spec.dataset.num_workers, world)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        d.train()
        d.on_epoch_start(epoch)
        # Running totals stay on the device: converting each term per step would add a host
        # sync per loss term; only the total is read per step (for the NaN check).
        sums: dict[str, torch.Tensor] = {}
        n, correct, total = 0, torch.zeros((), dtype=torch.long, device=dev), 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{spec.recipe.epochs}", leave=False,
                   disable=not sys.stderr.isatty(), dynamic_ncols=True)
        for step, (images, labels, indices) in enumerate(bar):
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            with self.rt.autocast():
                logits, losses = d.forward_train(images, labels, epoch, indices=indices.to(dev))
            loss = sum(losses.values())
            value = float(loss.detach())
            if not math.isfinite(value):
                terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                raise TrainingError(f"{self.out}: loss is {value} at epoch {epoch} step {step} "
                                    f"(method {spec.method}, lr {lr:g}; terms: {terms}). "
                                    "Lower the learning rate or check the inputs.")
            b = labels.shape[0]
            self.optimizer.zero_grad(set_to_none=True)
            if world.distributed:
                # This part's share of the global batch: the gradients summed over ranks are then
                # those of the global batch's mean loss, as in a single process.
                share = b / distributed.global_batch_size(step, batch_size, len(self.data.train))
                (loss * share).backward()
                distributed.sum_gradients(params)
            else:
                loss.backward()
            self.optimizer.step()
            n += b
            correct += (logits.detach().argmax(1) == labels).sum()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().double() * b
            total += value * b
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
        d.on_epoch_end(epoch)
        sums = {k: float(v) for k, v in sums.items()} | {"loss": total}
        correct = int(correct)
        if world.distributed:  # epoch figures over the global batch, identical on every rank
            keys = sorted(sums)
            n, correct, *totals = distributed.sum_values([n, correct, *(sums[k] for k in keys)])
            n, correct, sums = int(n), int(correct), dict(zip(keys, totals, strict=True))
        return {"lr": lr, "train_top1": 100.0 * correct / max(n, 1),
                **{f"train_{k}": v / max(n, 1) for k, v in sums.items()}}

    def _evaluate(self) -> dict[str, float]:
        spec = self.spec
        self.distiller.eval()
        out = {}
        splits = {"test": self.data.test} | ({"val": self.data.val} if self.data.val is not None else {})
        for name, ds in splits.items():
            loader = self.data.eval_loader(ds, spec.train.eval_batch_size, spec.dataset.num_workers)
            res = evaluate(self.distiller, loader, self.rt.device, self.rt.autocast)
            out.update({f"{name}_{k}": v for k, v in res.items()})
        return out

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        spec = self.spec
        self.out.mkdir(parents=True, exist_ok=True)
        tracker = _tracker(spec, self.run_id, self.world) if self.track else None
        if tracker:
            self.run_id = tracker.run_id
        try:
            for epoch in range(self.start_epoch, spec.recipe.epochs):
                t0 = time.perf_counter()
                row = {"epoch": epoch, **self._train_epoch(epoch), **self._evaluate()}
                row["seconds"] = time.perf_counter() - t0
                self.history.append(row)
                # Logged before the checkpoint: a kill in between replays this epoch and logs
                # the same values again, rather than losing them.
                if tracker:
                    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                self._save(epoch + 1)
                if self.world.main:
                    log.info("%s epoch %d/%d lr %.4g loss %.4f train %.2f test top1 %.2f top5 %.2f (%.1fs)",
                             spec.arch, epoch + 1, spec.recipe.epochs, row["lr"], row["train_loss"],
                             row["train_top1"], row["test_top1"], row["test_top5"], row["seconds"])
            metrics = summarize(self.history, spec)
            if not self.world.main:
                return metrics
            export_model(self.out / "model.pt", self.distiller.student, arch=spec.arch,
                         num_classes=self.data.num_classes, epoch=spec.recipe.epochs,
                         accuracy=metrics["last_top1"], method=spec.method)
            atomic_write_json(self.out / "metrics.json", metrics)
            if tracker:
                tracker.log_metrics({k: metrics[k] for k in ("best_top1", "last_top1", "best_top5", "last_top5")},
                                    step=spec.recipe.epochs)
                tracker.log_artifact(self.out / "metrics.json")
                tracker.log_artifact(self.out / "model.pt")
                tracker.finish("FINISHED")
            return metrics
        except BaseException:
            if tracker:
                tracker.finish("FAILED")
            raise


def summarize(history: list[dict[str, Any]], spec: RunSpec) -> dict[str, Any]:
    """metrics.json: best and last epoch figures, labelled, plus the per-epoch history.

    ``best_*`` is the best test accuracy over epochs (mdistiller / TSKD authors' figure);
    ``last_*`` the final epoch (RepDistiller's figure). With a validation split, the epoch
    is chosen on validation and ``selected_*`` is the test accuracy at that epoch.
    """
    best = max(history, key=lambda r: r["test_top1"])
    last = history[-1]
    m: dict[str, Any] = {
        "preset": spec.preset, "role": spec.role, "method": spec.method, "student": spec.arch,
        "teacher": spec.teacher_arch, "seed": spec.seed, "epochs": spec.recipe.epochs,
        "best_top1": best["test_top1"], "best_top5": max(r["test_top5"] for r in history),
        "best_epoch": best["epoch"], "last_top1": last["test_top1"], "last_top5": last["test_top5"],
        "history": history,
    }
    if "val_top1" in last:
        sel = max(history, key=lambda r: r["val_top1"])
        m.update(selected_epoch=sel["epoch"], selected_top1=sel["test_top1"], selected_top5=sel["test_top5"])
    return m


def train(spec: RunSpec, *, track: bool = True) -> dict[str, Any]:
    """Train one run (teacher or student) to completion; returns the metrics.json content.

    With ``WORLD_SIZE > 1`` in the environment, this process is one rank of a data-parallel
    run (see ``tskd.engine.distributed``); every rank returns the same metrics.
    """
    with distributed.process_group(uses_cuda(spec.train)) as world:
        return Trainer(spec, track=track, world=world).run()
