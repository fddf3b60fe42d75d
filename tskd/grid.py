"""The experiment grid of a preset: every job, its output directory and its run spec.

This is the one place that turns params into jobs. The Snakefile (and the DVC pipeline)
derive their stages from it, so the two cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tskd.config import DatasetCfg, PairCfg, Preset, RecipeCfg, Strict, TrainCfg


class RunSpec(Strict):
    """Everything one training call reads. Passed to ``tskd train`` as JSON."""

    preset: str
    role: Literal["teacher", "student"]
    method: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    arch: str
    teacher_arch: str | None = None
    teacher_path: str | None = None  # our exported model.pt or a published checkpoint
    seed: int
    dataset: DatasetCfg
    recipe: RecipeCfg
    train: TrainCfg
    out_dir: str
    experiment: str

    def resume_key(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (the output dir may move)."""
        return self.model_dump(mode="json", exclude={"out_dir", "experiment", "train"}) | {
            "train": self.train.model_dump(mode="json", exclude={"eval_batch_size"})}


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


def teacher_dir(p: Preset, arch: str) -> Path:
    return p.out / "teachers" / arch / f"seed{p.teachers[arch].seed}"


def student_dir(p: Preset, method: str, pair: PairCfg, seed: int) -> Path:
    # The student alone does not depend on the teacher: one run per student architecture.
    run = pair.student if method == "vanilla" else pair.name
    return p.out / "students" / method / run / f"seed{seed}"


def experiment_name(p: Preset) -> str:
    return p.tracking.experiment or f"tskd-{p.preset}"


def _recipe(p: Preset, name: str) -> RecipeCfg:
    return p.recipes[name]


def teacher_spec(p: Preset, arch: str) -> RunSpec:
    t = p.teachers[arch]
    return RunSpec(preset=p.preset, role="teacher", method="vanilla", arch=arch, seed=t.seed,
                   dataset=dataset_for_run(p), recipe=_recipe(p, t.recipe), train=p.train,
                   out_dir=str(teacher_dir(p, arch)), experiment=experiment_name(p))


def student_spec(p: Preset, method: str, pair: PairCfg, seed: int) -> RunSpec:
    alone = method == "vanilla"
    return RunSpec(preset=p.preset, role="student", method=method, method_params=p.method_params(method, pair),
                   arch=pair.student, teacher_arch=None if alone else pair.teacher,
                   teacher_path=None if alone else str(teacher_dir(p, pair.teacher) / "model.pt"), seed=seed,
                   dataset=dataset_for_run(p), recipe=_recipe(p, p.student_recipe), train=p.train,
                   out_dir=str(student_dir(p, method, pair, seed)), experiment=experiment_name(p))


def student_jobs(p: Preset) -> list[tuple[str, PairCfg, int]]:
    """(method, pair, seed) for every student run. ``vanilla`` runs once per student arch."""
    jobs: dict[Path, tuple[str, PairCfg, int]] = {}
    for method in p.methods:
        for pair in p.pairs:
            for seed in p.seeds:
                jobs.setdefault(student_dir(p, method, pair, seed), (method, pair, seed))
    return list(jobs.values())
