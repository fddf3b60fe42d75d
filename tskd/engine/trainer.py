"""The one training loop: every method, every dataset, teachers and students alike."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tskd.data.integrity import sha256_file
from tskd.distill import DistillContext, build_distiller
from tskd.distill.registry import parse_method_params
from tskd.distill.tskd.compiled import check_compiles
from tskd.engine import distributed
from tskd.engine.checkpoint import export_model, load_latest_checkpoint, remove_checkpoints, save_checkpoint
from tskd.engine.distributed import SINGLE, World
from tskd.engine.epoch_state import EpochTotals, restore_rng
from tskd.engine.events import Observer, RunView, overrides
from tskd.engine.loaders import build_run_data
from tskd.engine.phase_clock import PhaseClock
from tskd.engine.progress import ProgressLog
from tskd.engine.run_lock import run_dir_lock
from tskd.engine.runtime import Runtime, seed_epoch, select_runtime, uses_cuda
from tskd.errors import TskdError
from tskd.io import atomic_write_json
from tskd.models import create_model, model_entry
from tskd.models.published import load_model_file
from tskd.spec.config import fingerprint
from tskd.spec.grid import RunSpec
from tskd.tasks import Task, task_of

log = logging.getLogger("tskd.train")


class TrainingError(TskdError, RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


def _base_lr(spec: RunSpec) -> float:
    small = model_entry(spec.arch).small
    return spec.recipe.lr_small if (small and spec.recipe.lr_small) else spec.recipe.lr


@dataclass(frozen=True)
class TeacherFile:
    """The frozen teacher of a distillation run and what its file says about it."""

    model: torch.nn.Module
    sha256: str  # the file's content: part of the run's identity
    input_spec: dict[str, Any] | None  # what it was trained on (our exports record it)


def _load_teacher(spec: RunSpec, num_classes: int, model_kwargs: dict[str, Any]) -> TeacherFile | None:
    if spec.teacher_path is None:
        return None

    path = Path(spec.teacher_path)
    model, input_spec = load_model_file(path, spec.teacher_arch, num_classes=num_classes, **model_kwargs)
    return TeacherFile(model, sha256_file(path), input_spec)


def _student(spec: RunSpec, num_classes: int, model_kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str | None]:
    """The network to train, and the sha256 of the file its backbone starts from (None: from scratch).

    A detector given ``backbone_path`` is built as torchvision builds one on a pretrained backbone
    (FrozenBatchNorm2d, the first layers frozen) and the ImageNet file is loaded into its backbone.
    A detector also takes the recipe's detection settings (``RecipeCfg.DETECTION_ONLY``)."""
    if model_entry(spec.arch).family == "detection":
        model_kwargs = {**model_kwargs, "rpn_post_nms_top_n_train": spec.recipe.rpn_post_nms_top_n_train}
    if spec.backbone_path is None:
        return create_model(spec.arch, num_classes=num_classes, **model_kwargs), None
    from tskd.models.detection import load_backbone_weights  # lazy: torchvision

    layers = spec.recipe.trainable_backbone_layers.get(spec.arch)
    if layers is not None:  # else torchvision's default for a pretrained backbone
        model_kwargs = {**model_kwargs, "trainable_layers": layers}
    model = create_model(spec.arch, num_classes=num_classes, pretrained_backbone=True, **model_kwargs)
    load_backbone_weights(model, spec.backbone_path)
    return model, sha256_file(Path(spec.backbone_path))


# The layers whose weights and biases ``weight_decay_norm`` decays: detectron2's list (its
# get_default_optimizer_params) less LocalResponseNorm, which has none. _NormBase: every BatchNorm
# (SyncBatchNorm included) and InstanceNorm.
NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def decay_groups(module: torch.nn.Module, params: list[torch.nn.Parameter], weight_decay_norm: float | None
                 ) -> list[torch.nn.Parameter] | list[dict[str, Any]]:
    """The optimizer's parameters: ``params`` as they are when ``weight_decay_norm`` is None (one group,
    the optimizer's weight decay), else the normalisation layers' among them in a group of their own
    with that decay."""
    if weight_decay_norm is None:
        return params
    norm = {id(p) for m in module.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    return [{"params": [p for p in params if id(p) not in norm]},
            {"params": [p for p in params if id(p) in norm], "weight_decay": weight_decay_norm}]


def run_identity(spec: RunSpec, method_params: dict[str, Any], teacher_sha256: str | None, data_identity: str,
                 device: str) -> dict[str, Any]:
    """Everything that decides a run's result: the spec's identity with the effective method params,
    the teacher file's hash, the dataset's identity and the device it trains on."""
    return spec.identity() | {"method_params": method_params, "teacher_sha256": teacher_sha256,
                              "data_identity": data_identity, "device": device}


class Trainer:
    """Trains ``spec`` to completion, resuming from ``<out_dir>/checkpoint.pt`` if it was written
    by an unfinished run of the same identity (``run_identity``); otherwise it trains from the start.

    In a data-parallel run (``world.size > 1``, see ``tskd.engine.distributed``) every rank
    runs this same loop on its part of each batch; only rank 0 writes files.

    What else happens during the run (tracking, a method's recorders, the progress line) is done by
    observers of the loop's events (tskd.engine.events): ``observers`` given here (a tracker), the
    method's own (``Distiller.observers``) and the progress line.
    """

    def __init__(self, spec: RunSpec, *, observers: Sequence[Observer] = (), world: World = SINGLE):
        self.spec = spec
        self.out = Path(spec.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.world = world
        self.rt: Runtime = select_runtime(spec.train)
        torch.use_deterministic_algorithms(spec.train.deterministic and self.rt.device.type == "cpu")
        self.task = task_of(spec.dataset.name)  # what is learnt and how it is scored
        # Seconds of each phase outside the epochs, logged at the end (the per-job overhead that
        # benchmarks/bench_scale.py reads from a grid's logs).
        self.clock = PhaseClock()
        self.data = build_run_data(spec.dataset, spec.recipe)
        self.clock.lap("data")
        torch.manual_seed(spec.seed)  # model initialisation
        # Global-batch BatchNorm statistics, so that N ranks train as one process would. The networks
        # are converted before the method is built on them: a method may keep its own references to
        # their layers (TSKD's snapshot forwards), and a teacher in train-mode BN needs it too.
        cuda = self.rt.device.type == "cuda"
        bn_world = world if spec.recipe.batchnorm == "global" else SINGLE  # SINGLE: nothing converted
        kw = self.data.model_kwargs
        student, backbone_sha256 = _student(spec, self.data.num_classes, kw)
        student = distributed.sync_batchnorm(student, bn_world, cuda)
        teacher = _load_teacher(spec, self.data.num_classes, kw)
        if teacher is not None:
            teacher = dataclasses.replace(teacher, model=distributed.sync_batchnorm(teacher.model, bn_world, cuda))
        ctx = DistillContext(num_classes=self.data.num_classes, image_size=self.data.image_size,
                             epochs=spec.recipe.epochs, num_train=len(self.data.train),
                             train_labels=self.data.train_labels,
                             steps_per_epoch=self.data.epoch_steps(spec.recipe.batch_size),
                             classes=self.data.classes)
        task = self.task.name
        method_params = parse_method_params(spec.method, spec.method_params, task=task).model_dump(mode="json")
        distiller = build_distiller(spec.method, student, teacher and teacher.model, method_params, ctx, task=task)
        self.input_spec = self.data.input_spec
        self.tags = self._feed_teacher(distiller, teacher) | {"dataset": self.data.name}
        self.distiller = distributed.sync_batchnorm(distiller, bn_world, cuda)  # the method's own layers
        self.rt.place(self.distiller)
        if spec.train.compile:
            self._compile_networks()
        self.step_module = distributed.train_step(
            self.distiller, world, self.rt.device,
            every_parameter_every_step=self.distiller.every_parameter_every_step)
        self.base_lr = _base_lr(spec)
        r = spec.recipe
        self.params = list(self.distiller.trainable_parameters())
        groups = decay_groups(self.distiller, self.params, r.weight_decay_norm)
        self.optimizer = torch.optim.SGD(groups, lr=self.base_lr, momentum=r.momentum, nesterov=r.nesterov,
                                         weight_decay=r.weight_decay)
        self.identity = run_identity(spec, method_params, teacher and teacher.sha256, self.data.identity,
                                     self.rt.device.type)
        if backbone_sha256:  # only then: the identity of every other run stays what it was
            self.identity["backbone_sha256"] = backbone_sha256
        self.key = fingerprint(self.identity)
        self.keep_zeroed = self.distiller.keep_zeroed_grads()
        self.start_epoch = 0
        self.partial: dict[str, Any] | None = None  # how far into start_epoch a checkpoint got
        self.history: list[dict[str, Any]] = []
        self.view = RunView(spec=spec, out=self.out, key=self.key, identity=self.identity, tags=self.tags,
                            data=self.data, task=self.task, world=world, runtime=self.rt, distiller=self.distiller)
        self.observers = [*self.distiller.observers(), *observers, ProgressLog()]
        names = [o.name for o in self.observers]
        if len(set(names)) != len(names):
            raise ValueError(f"observers of a run need distinct names (their checkpoint keys): {names}")
        # A checkpoint found in the directory: ("resume" or "discarded", its content), told to the
        # observers when the run starts (a run whose result is already there tells them nothing).
        self._found: tuple[str, dict[str, Any]] | None = None
        self._resume()
        self.clock.lap("models")

    def _compile_networks(self) -> None:
        """torch.compile the student's and the teacher's forwards, in place (``Module.compile``: the
        state_dict keys stay the architecture's). Checked on a tiny kernel first, so a machine that
        cannot build kernels fails now, naming the param."""
        check_compiles(self.rt.device, "train.compile")
        self.distiller.student.compile()
        if self.distiller.needs_teacher:
            self.distiller.teacher.compile()

    def _feed_teacher(self, distiller, teacher: TeacherFile | None) -> dict[str, str]:
        """Compare the teacher's training input with this run's; renormalise if the recipe says so.
        Returns the MLflow tags that record it."""
        if teacher is None or teacher.input_spec is None:
            return {}
        t, s = teacher.input_spec, self.input_spec
        if (t.get("mean"), t.get("std")) == (s["mean"], s["std"]):
            return {"teacher_input": "same normalisation as its training"}
        how = self.spec.recipe.teacher_input
        log.warning("%s: the teacher %s was trained on %s-normalised images; this run's recipe normalises with "
                    "%s statistics, and recipes.<recipe>.teacher_input: %s %s", self.out, self.spec.teacher_path,
                    t.get("normalization"), s["normalization"], how,
                    "feeds it the student's tensor as it is (the TSKD authors' choice)" if how == "student"
                    else "re-normalises the images for it")
        if how == "renormalize":
            distiller.renormalize_teacher_input(s["mean"], s["std"], t["mean"], t["std"])
        return {"teacher_input": f"{how}: teacher trained with {t.get('normalization')}, "
                                 f"student input {s['normalization']}"}

    # -- resume -----------------------------------------------------------------------------
    def _resume(self) -> None:
        state = load_latest_checkpoint(self.ckpt_path)
        if state is None:
            return
        if state.get("key") != self.key:
            # Another identity (the teacher, the data, the device or a param changed): its state is not
            # this run's to continue.
            log.warning("%s: written for another run (teacher, data or params differ); training from the start",
                        self.ckpt_path)
            self._found = ("discarded", state)
            return
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        for i in state.get("zeroed_grads", []):  # as the uninterrupted run has them (keep_zeroed_grads)
            self.params[i].grad = torch.zeros_like(self.params[i])
        self.start_epoch = state["epoch"]
        self.partial = state.get("partial")
        self.history = state["history"]
        self._found = ("resume", state)
        log.info("resuming %s at epoch %d%s", self.out, self.start_epoch + 1,
                 f" step {self.partial['step'] + 1}" if self.partial else "")

    def _save(self, epochs_done: int, partial: dict[str, Any] | None = None) -> None:
        """Checkpoint after ``epochs_done`` whole epochs, and with ``partial`` (EpochTotals.state) that
        far into the next one."""
        if not self.world.main:
            return
        zeroed = [i for i, p in enumerate(self.params) if p.grad is not None] if self.keep_zeroed else []
        observed = {o.name: st for o in self.observers if (st := o.state_dict()) is not None}
        save_checkpoint(self.ckpt_path, {"key": self.key, "epoch": epochs_done, "partial": partial,
                                         "history": self.history, "observers": observed,
                                         "distiller": self.distiller.state_dict(),
                                         "optimizer": self.optimizer.state_dict(), "zeroed_grads": zeroed,
                                         "spec": self.spec.model_dump(mode="json")})

    def _tell_found(self) -> None:
        """Tell the observers about the checkpoint found in the directory. One written before observers
        (no "observers" entry) holds their states at its top level, under the same keys."""
        if self._found is None:
            return
        what, state = self._found
        for o in self.observers:
            if what == "discarded":
                o.on_discarded(self.view, state)
            else:
                saved = state["observers"].get(o.name) if "observers" in state else state
                partial = state.get("partial")
                o.on_resume(self.view, saved, state["epoch"], partial["step"] if partial else None)

    # -- one epoch ----------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, partial: dict[str, Any] | None = None) -> dict[str, float]:
        """Train one epoch; with ``partial`` (a mid-epoch checkpoint's), continue it from its step."""
        spec, d, dev = self.spec, self.distiller, self.rt.device
        lr = spec.recipe.lr_at(self.base_lr, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        world, batch_size, every = self.world, spec.recipe.batch_size, spec.train.check_finite_every
        gen = seed_epoch(spec.seed, epoch, world.rank)
        start = partial["step"] if partial else 0
        totals = EpochTotals(self.task.train_meter(dev), dev)
        if partial:
            totals.load(partial)
            restore_rng(partial["rng"], spec.seed, epoch, start, world.rank)
        loader = self.data.train_loader(batch_size, gen, spec.dataset.num_workers, world, dev, start=start)
        steps = start + len(loader)
        d.train()
        d.on_epoch_start(epoch)
        # Whether any loss since the last check was not finite, kept on the device: reading it every
        # step would make the host wait for the GPU every step (see TrainCfg.check_finite_every).
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        saved_at = time.monotonic()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{spec.recipe.epochs}", leave=False, initial=start,
                   total=steps, disable=not sys.stderr.isatty(), dynamic_ncols=True)
        # Steps of a whole epoch (of the global batch), whatever this rank's part or the resume point.
        per_epoch = self.data.epoch_steps(batch_size)
        step_observers = [o for o in self.observers if overrides(o, "on_step")]
        for step, batch in enumerate(bar, start=start):
            if spec.recipe.warmup_iters:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * spec.recipe.warmup_at(epoch * per_epoch + step)
            d.on_step_start(epoch * per_epoch + step)
            inputs, targets, indices = self.task.to_device(batch, self.rt)
            self.optimizer.zero_grad(set_to_none=not self.keep_zeroed)
            with self.rt.autocast():
                outputs, losses = self.step_module(inputs, targets, epoch, indices)
            loss = sum(losses.values())
            bad |= ~torch.isfinite(loss.detach())
            b = self.task.count(targets)
            if world.distributed:
                # DDP averages the ranks' gradients while the backward runs; scaled so, the average is
                # the gradient of the global batch's mean loss, as in a single process.
                global_batch = self.data.global_batch(step, batch_size)
                (loss * distributed.loss_scale(world, b, global_batch)).backward()
            else:
                loss.backward()
            if spec.recipe.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(self.params, spec.recipe.grad_clip_norm)
            self.optimizer.step()
            d.on_step_end(epoch * per_epoch + step)
            totals.add(losses, loss, b, outputs, targets, d.take_monitors())
            for o in step_observers:
                o.on_step(self.view, epoch, step, losses)
            if (step + 1) % every == 0 or step + 1 == steps:
                self._check_finite(bad, epoch, step, losses, lr)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
                # Only right after a passing check: a checkpoint never holds the weights of a NaN step.
                minutes = spec.train.checkpoint_minutes
                if minutes and step + 1 < steps and time.monotonic() - saved_at >= 60 * minutes:
                    self._save(epoch, partial=totals.state(step + 1))
                    saved_at = time.monotonic()
        d.on_epoch_end(epoch)
        n, kept, sums = totals.result(world)
        monitors = totals.monitor_means(world)
        monitors |= d.derived_monitors(monitors)
        return {"lr": lr, **{f"train_{k}": v for k, v in totals.meter.result(kept, n).items()},
                **{f"train_{k}": v / max(n, 1) for k, v in sums.items()},
                **{f"train_{k}": v for k, v in monitors.items()}}

    def _check_finite(self, bad: torch.Tensor, epoch: int, step: int, losses: dict[str, torch.Tensor],
                      lr: float) -> None:
        """Raise if a loss since the last check was not finite, on any rank: every rank reaches the
        same verdict, so none is left waiting in a collective for one that stopped."""
        if self.world.distributed:
            bad = distributed.any_rank(bad)
        if bool(bad):
            every = self.spec.train.check_finite_every
            now = float(sum(losses.values()).detach())
            what = f"loss is {now}" if not math.isfinite(now) else "a loss was not finite"
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
            # Numbered from 1, as the log's "epoch 3/40" and the history rows.
            where = f"step {step + 1}" if every == 1 else f"one of steps {max(1, step + 2 - every)}-{step + 1}"
            ranks = f" on one of {self.world.size} ranks" if self.world.distributed else ""
            raise TrainingError(f"{self.out}: {what} at epoch {epoch + 1} {where}{ranks} (method {self.spec.method}, "
                                f"lr {lr:g}; terms now: {terms}). Lower the learning rate or check the inputs.")

    def _evaluate(self) -> dict[str, float]:
        spec = self.spec
        self.distiller.eval()
        out = {}
        splits = {"test": self.data.test} | ({"val": self.data.val} if self.data.val is not None else {})
        for name, ds in splits.items():
            loader = self.data.eval_loader(ds, spec.train.eval_batch_size, spec.dataset.num_workers, self.world)
            res = self.task.evaluate(self.distiller, loader, self.rt, self.world)
            out.update({f"{name}_{k}": v for k, v in res.items()})
        return out

    # -- the run ----------------------------------------------------------------------------
    def _cost(self) -> dict[str, float]:
        """What the run cost: its devices (GPUs, or CPU threads: one per rank on CUDA, the ranks'
        threads on CPU) and device-seconds, the epochs' wall seconds (resumed attempts' included, as
        the history keeps them) times the devices: GPU-hours on a cluster, core-hours on CPU."""
        per_rank = 1 if self.rt.device.type == "cuda" else torch.get_num_threads()
        devices = self.world.size * per_rank
        seconds = sum(float(r.get("seconds") or 0.0) for r in self.history)
        return {"devices": float(devices), "device_seconds": round(seconds * devices, 3)}

    def finished_result(self) -> dict[str, Any] | None:
        """The directory's metrics.json when a run of this very identity finished there (the writer
        this call waited for, or one that ended before it started), else None."""
        try:
            metrics = json.loads((self.out / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        done = isinstance(metrics, dict) and metrics.get("run_key") == self.key and (self.out / "model.pt").is_file()
        return metrics if done else None

    def run(self) -> dict[str, Any]:
        spec, view = self.spec, self.view
        self.out.mkdir(parents=True, exist_ok=True)
        self.clock.restart()
        try:
            self._tell_found()
            for o in self.observers:
                o.on_run_start(view)
            self.clock.lap("run start")
            for epoch in range(self.start_epoch, spec.recipe.epochs):
                t0 = time.perf_counter()
                partial, self.partial = (self.partial if epoch == self.start_epoch else None), None
                # Epochs are numbered from 1 in every file and record, as the log says "epoch 40/40";
                # the loop's `epoch` (0-based) is what the schedules and the seeds read.
                row = {"epoch": epoch + 1, **self._train_epoch(epoch, partial)}
                results = self._evaluate()
                for o in self.observers:
                    o.on_evaluation(view, epoch, results)
                row |= results
                row["seconds"] = time.perf_counter() - t0
                self.history.append(row)
                # Before the checkpoint: a kill in between replays this epoch and its events (a tracker
                # logs the same values again rather than losing them), and the checkpoint holds the
                # observers' state as of this epoch.
                for o in self.observers:
                    o.on_epoch_end(view, epoch, row)
                self._save(epoch + 1)
            self.clock.lap("epochs")
            metrics = summarize(self.history, spec, self.task) | {"dataset": self.data.name, "run_key": self.key}
            metrics |= self._cost()
            model = self.out / "model.pt"
            if self.world.main:
                export_model(model, self.distiller.student, arch=spec.arch, num_classes=self.data.num_classes,
                             epoch=spec.recipe.epochs, accuracy=metrics[f"last_{self.task.best}"],
                             method=spec.method, input_spec=self.input_spec)
            files = [f for o in self.observers for f in o.on_result(view, metrics)]
            if not self.world.main:
                return metrics
            atomic_write_json(self.out / "metrics.json", metrics)
            # The run is complete: its checkpoint must never stand in for a later run asked of this
            # directory (forced, or with other inputs), which trains from the start instead.
            remove_checkpoints(self.ckpt_path)
            for o in self.observers:
                o.on_run_end(view, metrics, [self.out / "metrics.json", model, *files])
            self.clock.lap("teardown")
            log.info("%s: seconds: %s", self.out, self.clock.wall_line())
            log.info("%s: CPU seconds: %s", self.out, self.clock.cpu_line())
            return metrics
        except BaseException as e:
            for o in self.observers:
                with contextlib.suppress(Exception):  # the run's own error is the one to raise
                    o.on_run_failed(view, e)
            raise


def summarize(history: list[dict[str, Any]], spec: RunSpec, task: Task | None = None) -> dict[str, Any]:
    """metrics.json: what the run is, its task's best / last (/ selected) figures
    (``tskd.tasks.base.summarize_epochs``), and the per-epoch history."""
    task = task or task_of(spec.dataset.name)
    return {"preset": spec.preset, "role": spec.role, "method": spec.method, "variant": spec.variant or spec.method,
            "student": spec.arch,
            "teacher": spec.teacher_arch, "recipe": spec.recipe_name, "seed": spec.seed,
            "epochs": spec.recipe.epochs, "task": task.name, **task.summarize(history),
            "history": uniform_rows(history)}


def uniform_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column, ``None`` where an epoch has no value (TSKD's review loss exists in
    review epochs only): DVC's plots fail on rows whose columns differ ("argument of type 'NoneType'
    is not iterable") and leave the whole run out."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    return [{k: row.get(k) for k in columns} for row in history]


def train(spec: RunSpec, *, observers: Sequence[Observer] = ()) -> dict[str, Any]:
    """Train one run (teacher or student) to completion; returns the metrics.json content.
    ``observers``: what else listens to the run (tskd.tracking.observer.TrackingObserver records it
    in MLflow).

    With ``WORLD_SIZE > 1`` in the environment, this process is one rank of a data-parallel
    run (see ``tskd.engine.distributed``); every rank returns the same metrics.
    """
    # One writer per directory: a second call (a restarted Snakemake's) waits for the first and, when
    # that one finished this very run, takes its result instead of training it again. It does so
    # also when the first ended before the second reached the lock (a job that sat in SLURM's queue
    # while its twin finished): the result is keyed by content (run_key), and every path that asks
    # for a run again (`snakemake -R/--force`, which `dvc repro` runs) removes metrics.json first.
    # The other ranks read the directory only after rank 0 holds the lock (the DDP set-up in
    # Trainer waits for rank 0), so every rank reads the same metrics.json.
    with distributed.process_group(uses_cuda(spec.train)) as world, \
            run_dir_lock(spec.out_dir) if world.main else contextlib.nullcontext(False) as waited:
        trainer = Trainer(spec, observers=observers, world=world)
        done = trainer.finished_result()
        if done is not None:
            who = "the process this one waited for" if waited else "an earlier process"
            log.info("%s: %s trained it to the end with these inputs (metrics.json); not trained again",
                     spec.out_dir, who)
            return done
        return trainer.run()
