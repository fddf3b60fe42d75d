"""Evaluate an exported model file; import a published teacher as if we had trained it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tskd.data.integrity import sha256_file
from tskd.engine.checkpoint import export_model
from tskd.engine.loaders import RunData, build_run_data
from tskd.engine.runtime import select_runtime
from tskd.io import atomic_write_json
from tskd.models.published import check_torchvision_hash, load_published_checkpoint
from tskd.spec.grid import RunSpec
from tskd.tasks import task_of


def _test_figures(spec: RunSpec, data: RunData, model: torch.nn.Module) -> dict[str, Any]:
    rt = select_runtime(spec.train)
    rt.place(model).eval()
    loader = data.eval_loader(data.test, spec.train.eval_batch_size, spec.dataset.num_workers)
    task = task_of(spec.dataset.name)
    return task.evaluate(task.inference(model), loader, rt)


def evaluate_model_file(spec: RunSpec, model_path: Path, out: Path) -> dict[str, Any]:
    """Test accuracy of ``model_path`` (an exported student of ``spec.arch``), written to ``out``."""
    data = build_run_data(spec.dataset, spec.recipe)
    model = load_published_checkpoint(model_path, spec.arch, num_classes=data.num_classes, **data.model_kwargs)
    res = _test_figures(spec, data, model)
    atomic_write_json(out, {"model": str(model_path), "arch": spec.arch, "method": spec.method,
                            "seed": spec.seed, "num_classes": data.num_classes, **res})
    return res


def import_teacher(spec: RunSpec, checkpoint: Path) -> dict[str, Any]:
    """Load a published teacher file strictly, evaluate it, write model.pt + metrics.json."""
    digest = sha256_file(checkpoint)  # hashed once: checked against a torchvision name, and recorded
    check_torchvision_hash(checkpoint, digest)
    data = build_run_data(spec.dataset, spec.recipe)
    model = load_published_checkpoint(checkpoint, spec.arch, num_classes=data.num_classes, **data.model_kwargs)
    res = _test_figures(spec, data, model)
    task = task_of(spec.dataset.name)
    out = Path(spec.out_dir)
    # Published files do not say how their inputs were normalised: the teacher's recipe does.
    export_model(out / "model.pt", model, arch=spec.arch, num_classes=data.num_classes,
                 epoch=0, accuracy=res[task.best], method="imported", input_spec=data.input_spec)
    metrics = {"preset": spec.preset, "dataset": data.name, "role": "teacher", "method": "imported",
               "student": spec.arch, "teacher": None, "recipe": spec.recipe_name, "seed": spec.seed,
               "source": str(checkpoint), "source_sha256": digest, "epochs": 0, "task": task.name,
               **{f"{w}_{f}": res[f] for w in ("best", "last") for f in task.figures},
               "best_epoch": None, "history": []}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
