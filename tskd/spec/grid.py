"""The experiment grid of a preset: every job, its output directory and its run spec.

This is the one place that turns params into jobs. The Snakefile (and the DVC pipeline)
derive their stages from it, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field

from tskd.data.families import TASK_OF
from tskd.spec.config import DatasetCfg, PairCfg, Preset, RecipeCfg, Strict, TrainCfg

# The fields of a RunSpec that say where a run's files go and how it is labelled, not what it
# computes. Everything else is the run's identity (``RunSpec.identity``).
PLACEMENT = ("preset", "recipe_name", "variant", "teacher_path", "backbone_path", "out_dir", "experiment",
             "dataset.root", "dataset.download", "dataset.num_workers",
             *(f"train.{f}" for f in TrainCfg.RESULT_NEUTRAL))


# What a run writes, as a version. Part of every run's identity: bumped whenever the files of a run
# change meaning or content (metrics.json's fields, a new file), so that a result written by earlier
# code never passes for a current one, in Snakemake (the identity is a rule param), in DVC (the
# training and evaluation stages declare it from DEFAULTS_FILE) and for a checkpoint's resume.
#   1: the first; 2: epochs counted from 1 in every file; 3: TSKD runs write evolution.npz;
#   4: metrics.json records the run's devices and device_seconds (its cost).
RESULTS_FORMAT = 4


class RunSpec(Strict):
    """Everything one training call reads. Passed to ``tskd train`` as JSON.

    Its *identity* (``identity()``) is what decides the result; together with the teacher file's
    hash and the dataset's identity, which only the run itself can read, it keys the resume
    checkpoint, and it is what Snakemake's rerun trigger and MLflow's params hold. Its
    *placement* (``PLACEMENT``: output directory, MLflow experiment, labels, the dataset's and the
    teacher's paths, the evaluation batch size) may change without changing any result.
    ``method_params`` hold every value the method reads, defaults filled in (``tskd.spec.grid``
    fills them; the trainer fills them again for a spec written by hand).
    """

    preset: str
    role: Literal["teacher", "student"]
    method: str  # the registered method
    # The preset's name for a variant of ``method`` (``methods.<variant>.method``), None otherwise: a
    # label (placement), so that two names with the same params are the same run, keyed by content.
    variant: str | None = None
    method_params: dict[str, Any] = Field(default_factory=dict)
    arch: str
    teacher_arch: str | None = None
    teacher_path: str | None = None  # our exported model.pt or a published checkpoint
    backbone_path: str | None = None  # detection: the ImageNet file the backbone starts from
    seed: int
    dataset: DatasetCfg
    recipe: RecipeCfg
    recipe_name: str | None = None
    train: TrainCfg
    out_dir: str
    experiment: str

    def identity(self) -> dict[str, Any]:
        """The spec without its placement: what decides the result (as JSON-ready values)."""
        d = self.model_dump(mode="json")
        for path in PLACEMENT:
            *parents, leaf = path.split(".")
            node = d
            for part in parents:
                node = node[part]
            node.pop(leaf, None)
        return d | {"results_format": RESULTS_FORMAT}

    def placement(self) -> dict[str, Any]:
        """Only the placement fields, nested as in the spec."""
        d = self.model_dump(mode="json")
        out: dict[str, Any] = {}
        for path in PLACEMENT:
            *parents, leaf = path.split(".")
            src, dst = d, out
            for part in parents:
                src, dst = src[part], dst.setdefault(part, {})
            if leaf in src:  # not every dataset family has every field (ImageNet has no download)
                dst[leaf] = src[leaf]
        return out


def merge_parts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` with ``b``'s values, nested mappings merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_parts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class StudentJob(NamedTuple):
    """One student training run of the grid."""

    recipe: str
    method: str  # the name in the preset's `methods`: a registered method or a variant of one
    pair: PairCfg
    seed: int


def effective_method_params(method: str, raw: dict[str, Any] | None, dataset: str = "cifar100") -> dict[str, Any]:
    """Every param the method reads (its implementation for ``dataset``'s task), defaults filled in:
    a changed default changes the run's identity."""
    from tskd.distill.registry import parse_method_params  # imports torch: only where params are made

    return parse_method_params(method, raw, task=TASK_OF[dataset]).model_dump(mode="json")


def data_dir(p: Preset) -> Path:
    return p.out / "data"


def data_marker(p: Preset) -> Path:
    """Written by the data stage once the dataset is in place and verified."""
    return data_dir(p) / "dataset.json"


def dataset_for_run(p: Preset) -> DatasetCfg:
    # Synthetic data is written under the preset's results; real data stays where it is.
    if p.dataset.synthetic is not None:
        return p.dataset.model_copy(update={"root": str(data_dir(p))})
    return p.dataset


def published_teacher(p: Preset, arch: str) -> Path | None:
    """The file a teacher is imported from (``teachers.<arch>.checkpoint`` resolved), or None."""
    value = p.teachers[arch].checkpoint
    if value is None:
        return None
    from tskd.models.published import resolve_checkpoint  # lazy: torch

    return resolve_checkpoint(arch, value)


def backbone_file(p: Preset, arch: str) -> Path | None:
    """The ImageNet file ``arch``'s backbone starts from (``backbones.<arch>`` resolved), or None."""
    value = p.backbones.get(arch)
    if value is None:
        return None
    from tskd.models.detection import BACKBONE_OF  # lazy: torch
    from tskd.models.published import resolve_checkpoint  # lazy: torch

    return resolve_checkpoint(BACKBONE_OF[arch], value, key=f"backbones.{arch}")


def _backbone(p: Preset, arch: str) -> str | None:
    path = backbone_file(p, arch)
    return str(path) if path else None


def teacher_dir(p: Preset, arch: str) -> Path:
    return p.out / "teachers" / arch / f"seed{p.teachers[arch].seed}"


def student_dir(p: Preset, job: StudentJob) -> Path:
    # The student alone does not depend on the teacher: one run per student architecture.
    run = job.pair.student if job.method == "vanilla" else job.pair.name
    return p.out / "students" / job.recipe / job.method / run / f"seed{job.seed}"


def report_identity(p: Preset) -> dict[str, Any]:
    """What the report reads of a preset, less what cannot change a table (the MLflow experiment,
    the evaluation batch size): the report job's rerun trigger."""
    return p.model_dump(mode="json", exclude={"tracking": True, "train": set(TrainCfg.RESULT_NEUTRAL)})


def experiment_name(p: Preset) -> str:
    return p.tracking.experiment or f"tskd-{p.preset}"


def teacher_spec(p: Preset, arch: str) -> RunSpec:
    t = p.teachers[arch]
    return RunSpec(preset=p.preset, role="teacher", method="vanilla",
                   method_params=effective_method_params("vanilla", {}, p.dataset.name), arch=arch, seed=t.seed,
                   dataset=dataset_for_run(p), recipe=p.recipes[t.recipe].for_method("vanilla"),
                   recipe_name=t.recipe, train=p.train, backbone_path=None if t.checkpoint else _backbone(p, arch),
                   out_dir=str(teacher_dir(p, arch)), experiment=experiment_name(p))


def student_spec(p: Preset, job: StudentJob) -> RunSpec:
    alone = job.method == "vanilla"
    teacher = job.pair.teacher
    method = p.registered(job.method)
    return RunSpec(preset=p.preset, role="student", method=method, variant=None if method == job.method else job.method,
                   method_params=effective_method_params(method, p.method_params(job.method, job.pair, job.recipe),
                                                         p.dataset.name),
                   arch=job.pair.student, teacher_arch=None if alone else teacher,
                   teacher_path=None if alone else str(teacher_dir(p, teacher) / "model.pt"), seed=job.seed,
                   dataset=dataset_for_run(p), recipe=p.recipe_for(job.recipe, job.method),
                   recipe_name=job.recipe, train=p.train, backbone_path=_backbone(p, job.pair.student),
                   out_dir=str(student_dir(p, job)), experiment=experiment_name(p))


def student_jobs(p: Preset) -> list[StudentJob]:
    """Every student run. ``vanilla`` runs once per (recipe, student arch): the config refuses pairs
    that would give the same student alone different params."""
    jobs: dict[Path, StudentJob] = {}
    for recipe in p.student_recipes:
        for method in p.methods:
            for pair in p.pairs:
                for seed in p.seeds:
                    job = StudentJob(recipe, method, pair, seed)
                    jobs.setdefault(student_dir(p, job), job)
    return list(jobs.values())
