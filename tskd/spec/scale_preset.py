"""A preset's grid at its real shape and tiny cost: ``tskd scale-preset params/cifar100.yaml``.

The derived preset keeps what decides the grid's shape (teachers, pairs, architectures, methods and
their variants, student recipes, seeds, batch sizes: the same jobs, DAG and MLflow runs) and replaces
what decides its cost: synthetic data in the real on-disk format, a few epochs, no published files.
It is derived each time from the preset, never kept as a copy that drifts from it. Used to rehearse a
cluster run (``benchmarks/bench_scale.py``) before spending GPU-days on it.

Epoch-based method params are rewritten so that every job still does what it does at full size:

* warm-ups (``warmup``) are capped at the run's epochs;
* TSKD's node spacing ``delta`` becomes its rank among the preset's distinct deltas (5 -> 1; 2, 5,
  10 -> 1, 2, 3), so variants that differ by delta stay distinct runs, and ``k`` is kept; a
  recipe's TSKD runs get the fewest epochs that reach their first review (``by_method.tskd``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from tskd.errors import ParamsError
from tskd.spec.config import VARIANT_KEY, Preset, parse_preset
from tskd.spec.grid import effective_method_params, student_jobs
from tskd.spec.params_yaml import validate_strict

SUFFIX = "_scale"
TSKD = "tskd"


class ScaleError(ParamsError):
    """Options that cannot derive a grid from this preset."""


def scaled_milestones(milestones: list[int], epochs: int, new_epochs: int) -> list[int]:
    """Milestones at the same fractions of the run, each inside it (``[1, new_epochs - 1]``), in order."""
    if new_epochs < 2:
        return []
    return sorted({min(max(1, round(m * new_epochs / epochs)), new_epochs - 1) for m in milestones})


def _synthetic(dataset: dict[str, Any], batch: int, per_class: int | None) -> dict[str, Any]:
    """The dataset section: the family's synthetic data, sized to hold one batch of the largest recipe."""
    name = dataset.get("name", "cifar100")
    out = {k: v for k, v in dataset.items() if k not in ("root", "download", "synthetic")}
    out.update(num_workers=0, val_fraction=0.0)
    if name == "cifar100":
        n = per_class or 1
        out["synthetic"] = {"seed": 0, "train_per_class": n, "test_per_class": n}
    elif name == "imagenet":
        classes = 10
        n = per_class or max(1, math.ceil(batch / classes))
        out["synthetic"] = {"seed": 0, "classes": classes, "train_per_class": n, "val_per_class": per_class or 2,
                            "image_size": 40}
        out.update(crop=32, resize=36)
    elif name == "coco":
        # Orientation/aspect grouping trains on full batches only: two batches' worth of images.
        images = max(16, 2 * batch) if per_class is None else max(8, per_class)
        out["synthetic"] = {"seed": 0, "train_images": images, "val_images": 8}
        out.update(min_size=128, max_size=192)
    else:
        raise ScaleError(f"dataset.name: no synthetic form of {name!r} (cifar100, imagenet, coco)")
    return out


def _entry_dicts(raw: dict[str, Any], entry: str) -> list[dict[str, Any]]:
    """Every mapping of ``raw`` that holds params of the method entry ``entry``, at every level."""
    found = [raw["methods"].get(entry)]
    found += [r.get("methods", {}).get(entry) for r in raw["recipes"].values()]
    found += [p.get("methods", {}).get(entry) for p in raw["pairs"]]
    return [d for d in found if isinstance(d, dict)]


def _registered(raw: dict[str, Any], entry: str) -> str:
    return (raw["methods"][entry] or {}).get(VARIANT_KEY, entry)


def derive(raw: dict[str, Any], *, epochs: int = 2, per_class: int | None = None, pairs: int | None = None,
           seeds: int | None = None, recipes: int | None = None, name: str | None = None) -> dict[str, Any]:
    """The scale-test preset of the params mapping ``raw`` (validated first); ``pairs``, ``seeds`` and
    ``recipes`` keep only the first N of each (a reduced grid), ``None`` keeps all."""
    original = parse_preset(raw, "<preset>")
    if epochs < 1:
        raise ScaleError(f"--epochs: at least 1, got {epochs}")
    out = copy.deepcopy(raw)
    out["preset"] = name or f"{original.preset}{SUFFIX}"
    if original.tracking.experiment:
        out.setdefault("tracking", {})["experiment"] = f"{original.tracking.experiment}{SUFFIX}"
    for key, n in (("pairs", pairs), ("seeds", seeds), ("student_recipes", recipes)):
        if n is not None:
            if n < 1:
                raise ScaleError(f"--{key.replace('student_', '')}: at least 1, got {n}")
            out[key] = out[key][:n]
    # Teachers a reduced grid no longer uses are dropped with their recipes' students intact.
    used = {p["teacher"] for p in out["pairs"]}
    out["teachers"] = {a: t for a, t in out["teachers"].items() if a in used}

    batch = max(r.batch_size for r in original.recipes.values())
    out["dataset"] = _synthetic(dict(raw["dataset"]), batch, per_class)
    out.pop("backbones", None)  # ImageNet files a detector starts from: none here, detectors start from scratch
    for t in out["teachers"].values():
        t["checkpoint"] = None  # published teacher files: trained here instead
    # One thread a job: the rehearsal packs many jobs onto few cores; torch.compile would spend a minute
    # per job building kernels that a few steps never repay.
    out["train"] = {**out.get("train", {}), "compile": False, "threads": 1}
    for rname, r in out["recipes"].items():
        r["milestones"] = scaled_milestones(r.get("milestones", []), original.recipes[rname].epochs, epochs)
        r["epochs"] = epochs
        if "warmup_iters" in r:
            r["warmup_iters"] = min(r["warmup_iters"], epochs)
        for values in r.get("by_method", {}).values():
            if "epochs" in values:
                values["milestones"] = scaled_milestones(values.get("milestones", r["milestones"]),
                                                         values["epochs"], epochs)
                values["epochs"] = epochs

    dataset = original.dataset.name
    deltas = sorted({int(effective_method_params(TSKD, original.method_params(e, p, rn), dataset)["delta"])
                     for e in original.methods if original.registered(e) == TSKD
                     for p in original.pairs for rn in original.student_recipes})
    rank = {d: i + 1 for i, d in enumerate(deltas)}
    for entry in out["methods"]:
        reg = _registered(out, entry)
        defaults = effective_method_params(reg, {}, dataset)
        if out["methods"][entry] is None:
            out["methods"][entry] = {}
        top = out["methods"][entry]
        if "compile" in defaults:
            top["compile"] = False
        if "warmup" in defaults:
            top["warmup"] = min(top.get("warmup", defaults["warmup"]), epochs)
        if reg == TSKD:
            top["delta"] = rank.get(top.get("delta", defaults["delta"]), 1)
        for d in _entry_dicts(out, entry)[1:]:
            if "compile" in d:
                d["compile"] = False
            if "warmup" in d:
                d["warmup"] = min(d["warmup"], epochs)
            if reg == TSKD and "delta" in d:
                d["delta"] = rank[d["delta"]]

    # TSKD runs: enough epochs for their first review (k memory nodes, delta apart, then the review). Read
    # through the model alone (validate_strict): parse_preset's schedule check refuses this preset until then.
    shaped = validate_strict(Preset, out)
    for rname in shaped.student_recipes:
        need = max((_tskd_epochs(shaped, e, p, rname) for e in shaped.methods
                    if shaped.registered(e) == TSKD for p in shaped.pairs), default=0)
        if need > epochs:
            r = out["recipes"][rname]
            slot = r.setdefault("by_method", {}).setdefault(TSKD, {})
            slot["epochs"] = need
            slot["milestones"] = scaled_milestones(original.recipes[rname].milestones,
                                                   original.recipes[rname].epochs, need)
    derived = parse_preset(out, "<derived>")
    _same_shape(original, derived, reduced=any(n is not None for n in (pairs, seeds, recipes)))
    return out


def _tskd_epochs(p: Preset, entry: str, pair, recipe: str) -> int:
    """Epochs a TSKD run needs to reach its first review."""
    params = effective_method_params(TSKD, p.method_params(entry, pair, recipe), p.dataset.name)
    return int(params["k"]) * int(params["delta"]) + 1


def _same_shape(original: Preset, derived: Preset, reduced: bool) -> None:
    """The derived grid has the original's jobs (a reduced one: a subset of their kinds), or it is refused."""
    def shape(p: Preset) -> list[tuple]:
        return sorted((j.recipe, j.method, j.pair.teacher, j.pair.student, j.seed) for j in student_jobs(p))

    a, b = shape(original), shape(derived)
    if (not reduced and a != b) or (reduced and not set(b) <= set(a)):
        raise ScaleError(f"the derived grid has {len(b)} student jobs where the preset has {len(a)}: two method "
                         "entries became the same run; report this with the preset")


def job_counts(p: Preset) -> dict[str, int]:
    """Jobs of the DAG by rule, as Snakemake plans them from nothing."""
    students = len(student_jobs(p))
    return {"all": 1, "data": 1, "teacher": len(p.teachers), "student": students, "evaluate": students,
            "report": 1}
