"""The DVC pipeline of a preset, generated from the same grid as the Snakefile.

Each DVC stage is one job of the Snakemake DAG and its command asks Snakemake to run exactly
that job (``--force --allowed-rules <rule>``). Snakemake stays the one executor: it writes the
logs and MLflow runs and records its rerun metadata, so after ``dvc repro`` Snakemake has
nothing to redo and the other way round. DVC adds what Snakemake lacks: content hashes, a
cache and remotes for the datasets, models and metrics, and experiments.

The file is written by ``tskd dvc write`` and never edited by hand. It does not contain param
values, only the keys each stage reads, so ``dvc exp run -S ...`` needs no regeneration; only a
change of the grid's shape (a method, pair, seed or override added) does, and every stage
command checks that before running (``check_pipeline``).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tskd.data.families import TASK_OF, family
from tskd.distill.registry import list_methods, method_class
from tskd.engine.evolution import EVOLUTION_FILE, evolution_files, keeps_evolution
from tskd.errors import ParamsError
from tskd.io import atomic_write_text
from tskd.reporting.plots import plot_files
from tskd.reporting.report import summary_files
from tskd.reporting.study import study_files
from tskd.spec import grid
from tskd.spec.config import DATASET_MODELS, SYNTHETIC_MODELS, VARIANT_KEY, Preset, RecipeCfg, TrainCfg, load_preset
from tskd.tasks import task_of

ROOT_PRESET = "smoke"  # the preset whose pipeline is the repository's top-level dvc.yaml
# Every default the code fills in (method params, recipe, train and dataset settings), written by
# `tskd dvc write` beside the pipelines' params: stages declare the defaults they read, so a
# changed default reruns exactly the stages whose runs it changes, as it does in Snakemake.
DEFAULTS_FILE = "workflow/defaults.yaml"


@dataclass
class Stage:
    name: str
    rule: str  # the Snakemake rule whose job this stage runs
    targets: list[str]  # that job's Snakemake outputs
    inputs: list[str]  # that job's Snakemake inputs (what its mtimes are compared with)
    deps: list[str] = field(default_factory=list)
    params: list[str] | None = None  # keys of the params file; None: the whole file
    defaults: list[str] = field(default_factory=list)  # keys of DEFAULTS_FILE
    outs: list[str] = field(default_factory=list)
    persist: bool = False  # training stages: see `_out_entry`
    metrics: list[str] = field(default_factory=list)
    curve: str | None = None  # which training-curve plot its metrics.json joins


def pipeline_path(preset: Preset) -> Path:
    """Where ``tskd dvc write`` puts a preset's pipeline: dvc.yaml for smoke, else pipelines/<preset>/."""
    if preset.preset == ROOT_PRESET:
        return Path("dvc.yaml")
    return Path("pipelines") / preset.preset / "dvc.yaml"


def _present(raw: dict[str, Any], key: str) -> bool:
    node: Any = raw
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _keys(raw: dict[str, Any], *keys: str) -> list[str]:
    # DVC fails on a declared key that the file lacks, and a key the file lacks is read from its
    # default, which cannot change without editing the file (and so regenerating this pipeline).
    return [k for k in keys if _present(raw, k)]


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    node: Any = raw
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) and part.isdigit() else (
            node.get(part) if isinstance(node, dict) else None)
    return node if isinstance(node, dict) else {}


def _declare(raw: dict[str, Any], fields: list[str], layers: list[str], default: str,
             whole: bool = True) -> tuple[list[str], list[str]]:
    """Where each field's value comes from: the last of ``layers`` (params file sections, later
    ones override earlier ones) that sets it, else ``default`` (a section of DEFAULTS_FILE).
    A stage declares exactly these keys, so a value that a later section overrides, or a default
    that the file overrides, reruns nothing when it changes: in DVC as in Snakemake. With
    ``whole`` (``fields`` are all the keys the section may hold), a section all of whose keys are
    declared is declared whole: shorter, and a key added to it is covered. Returns the params file
    keys and the DEFAULTS_FILE keys."""
    by_layer: dict[str, list[str]] = {}
    defaults = []
    for f in fields:
        layer = next((layer for layer in reversed(layers) if f in _section(raw, layer)), None)
        if layer is None:
            defaults.append(f"{default}.{f}")
        else:
            by_layer.setdefault(layer, []).append(f)
    keys = []
    for layer, fs in by_layer.items():
        keys += [layer] if whole and set(fs) == set(_section(raw, layer)) else [f"{layer}.{f}" for f in fs]
    return keys, defaults


def _backbone_deps(p: Preset, arch: str) -> list[str]:
    path = grid.backbone_file(p, arch)
    return [str(path)] if path else []


def _fields(section: str, model, *skip: str) -> list[str]:
    """The fields of a params model that are part of a run's identity (not its placement)."""
    return [f for f in model.model_fields if f"{section}.{f}" not in grid.PLACEMENT and f not in skip]


# Sections that may also hold keys outside a run's identity are always declared key by key.
def _dataset_keys(p: Preset, raw: dict[str, Any]) -> list[tuple[list[str], list[str]]]:
    fam = p.dataset.name
    parts = [_declare(raw, _fields("dataset", DATASET_MODELS[fam], "synthetic"), ["dataset"], f"datasets.{fam}",
                      whole=False)]
    if p.dataset.synthetic is not None:
        parts.append(_declare(raw, list(SYNTHETIC_MODELS[fam].model_fields), ["dataset.synthetic"],
                              f"synthetic.{fam}"))
    return parts


def _run_keys(p: Preset, raw: dict[str, Any], recipe: str, method: str,
              method_layers: list[str]) -> tuple[list[str], list[str]]:
    """The params and defaults keys a training run's identity is built from (tskd.spec.grid)."""
    task = TASK_OF[p.dataset.name]
    recipe_layers = [f"recipes.{recipe}", f"recipes.{recipe}.by_method.{method}"]
    parts = [*_dataset_keys(p, raw),
             _declare(raw, _fields("recipe", RecipeCfg, "methods", "by_method"), recipe_layers, "recipe",
                      whole=False),
             _declare(raw, _fields("train", TrainCfg), ["train"], "train", whole=False),
             _declare(raw, list(method_class(method, task).Params.model_fields), method_layers,
                      f"{METHOD_DEFAULTS[task]}.{method}")]
    # results_format: what the run writes (tskd.spec.grid.RESULTS_FORMAT), a code default of every run.
    return [k for keys, _ in parts for k in keys], [k for _, defaults in parts for k in defaults] + ["results_format"]


# The defaults file's section of each task's method defaults (a name like `kd` exists for both).
METHOD_DEFAULTS = {"classification": "methods", "detection": "detection_methods"}


def code_defaults() -> dict[str, Any]:
    """The content of DEFAULTS_FILE: each section's defaults as the code has them now."""
    def defaults(section: str, model, *skip: str) -> dict[str, Any]:
        fields = model.model_fields
        return {k: fields[k].get_default(call_default_factory=True) for k in _fields(section, model, *skip)
                if not fields[k].is_required()}

    return {**{section: {m: method_class(m, task).Params().model_dump(mode="json") for m in list_methods(task)}
               for task, section in METHOD_DEFAULTS.items() if list_methods(task)},
            "results_format": grid.RESULTS_FORMAT,
            "recipe": defaults("recipe", RecipeCfg, "methods", "by_method"), "train": defaults("train", TrainCfg),
            "datasets": {fam: defaults("dataset", model, "synthetic") for fam, model in DATASET_MODELS.items()},
            "synthetic": {fam: defaults("synthetic", model) for fam, model in SYNTHETIC_MODELS.items()}}


def render_defaults() -> str:
    head = ("# Generated by `tskd dvc write` from the code's defaults: do not edit. DVC stages declare the\n"
            "# defaults their runs read, so a default changed in the code reruns those stages.\n")
    return head + yaml.safe_dump(code_defaults(), sort_keys=True, width=10_000, default_flow_style=False)


def _real_data(p: Preset) -> list[str]:
    return family(p.dataset.name).versioned_inputs(p.dataset)


def _data_deps(p: Preset) -> list[str]:
    if p.dataset.synthetic is not None:
        return [str(grid.data_dir(p))]  # the stage writes the whole directory
    return [str(grid.data_marker(p)), *_real_data(p)]


def stages(p: Preset, raw: dict[str, Any], params_file: str) -> list[Stage]:
    """Every stage in an order that respects the DAG (data, teachers, students, evaluations, report)."""
    out: list[Stage] = []
    marker = str(grid.data_marker(p))
    data_outs = [str(grid.data_dir(p))] if p.dataset.synthetic is not None else [marker]
    real_root = [] if p.dataset.synthetic is not None else _real_data(p)  # synthetic: written here
    out.append(Stage("data", "data", [marker], [], deps=real_root, params=_keys(raw, "dataset"), outs=data_outs,
                     defaults=[k for _, defaults in _dataset_keys(p, raw) for k in defaults]))
    for arch, t in p.teachers.items():
        d = grid.teacher_dir(p, arch)
        files = [str(d / "model.pt"), str(d / "metrics.json")]
        published = grid.published_teacher(p, arch)
        backbone = [] if published else _backbone_deps(p, arch)
        deps = _data_deps(p) + ([str(published)] if published else []) + backbone
        keys, defaults = _run_keys(p, raw, t.recipe, "vanilla", [])  # teachers: vanilla at its defaults
        out.append(Stage(f"teacher-{arch}-seed{t.seed}", "teacher", files, [marker], deps=deps,
                         params=[*keys, *_keys(raw, f"teachers.{arch}")], outs=files, persist=True,
                         curve=None if t.checkpoint else "teachers", defaults=defaults))
    evals = []
    for job in grid.student_jobs(p):
        d = grid.student_dir(p, job)
        tag = f"{job.recipe}-{job.method}-{d.parent.name}-seed{job.seed}"
        files = [str(d / "model.pt"), str(d / "metrics.json")]
        teacher = [] if job.method == "vanilla" else [str(grid.teacher_dir(p, job.pair.teacher) / "model.pt")]
        inputs = [marker, *teacher]
        layers = [f"methods.{job.method}", f"recipes.{job.recipe}.methods.{job.method}",
                  f"pairs.{p.pairs.index(job.pair)}.methods.{job.method}"]
        method = p.registered(job.method)
        keys, defaults = _run_keys(p, raw, job.recipe, method, layers)
        if method != job.method:  # a variant: the registered method it runs is a param of its own
            keys.append(f"methods.{job.method}.{VARIANT_KEY}")
        # The evolution file: written by the same job, not a Snakemake target (tskd.engine.evolution).
        extra = [str(d / EVOLUTION_FILE)] if keeps_evolution(p, job) else []
        out.append(Stage(f"train-{tag}", "student", files, inputs,
                         deps=_data_deps(p) + teacher + _backbone_deps(p, job.pair.student), params=keys,
                         outs=files + extra, persist=True, curve=job.method, defaults=defaults))
        evals.append(Stage(f"eval-{tag}", "evaluate", [str(d / "eval.json")], [files[0]],
                           deps=_data_deps(p) + [files[0]], params=keys, outs=[str(d / "eval.json")],
                           defaults=defaults))
    out += evals
    results = [f for s in out if s.rule in ("teacher", "student", "evaluate") for f in s.targets if f.endswith(".json")]
    summary = [str(f) for f in summary_files(p)]
    # The report reads the whole preset but the MLflow experiment and the evaluation batch size.
    report_keys = _keys(raw, *[k for k in raw if k not in ("tracking", "train")],
                        *(f"train.{f}" for f in _fields("train", TrainCfg)))
    files = [str(p.out / "report.md"), str(p.out / "report.html"), str(p.out / "report.csv")]
    plots = [str(f) for f in plot_files(p).values()] + [str(f) for f in study_files(p)]
    evolution = [str(f) for f in evolution_files(p)]
    out.append(Stage("report", "report", [*files, *summary, *plots], results, deps=results + evolution,
                     params=report_keys,
                     outs=files + plots, metrics=summary))
    return out


def _cmd(s: Stage, params_file: str) -> str:
    # --force: DVC decided that this job runs; --allowed-rules: and no other job (a missing input
    # is an error, not a reason to rebuild another stage's output behind DVC's back).
    return (f"snakemake --configfile {params_file} --cores all --force --allowed-rules {s.rule} "
            f"--quiet host progress rules -- " + " ".join(s.targets))


def _out_entry(path: str, persist: bool) -> Any:
    # persist: DVC's run-cache skips persistent outputs, so a training stage always really runs
    # (and records its MLflow run) instead of having its model restored from an earlier run with the
    # same inputs. Snakemake's --force still removes the old files before the job starts.
    return {path: {"persist": True}} if persist else path


def _stage_dict(s: Stage, params_file: str, wdir: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if wdir:
        d["wdir"] = wdir
    d["cmd"] = _cmd(s, params_file)
    if s.deps:
        d["deps"] = list(s.deps)
    d["params"] = [{params_file: None}] if s.params is None else [{params_file: list(s.params)}]
    if s.defaults:
        d["params"].append({DEFAULTS_FILE: list(s.defaults)})
    if s.outs:
        d["outs"] = [_out_entry(o, s.persist) for o in s.outs]
    if s.metrics:
        d["metrics"] = list(s.metrics)
    return d


def _plots(p: Preset, all_stages: list[Stage]) -> list[Any]:
    """Training curves: the test main figure per epoch, one vega plot for the teachers and one per
    method (drawn by DVC's HTML, which loads vega from a CDN), then the report's PNG plots, which
    DVC shows as images (readable offline)."""
    key = f"test_{task_of(p.dataset.name).best}"
    groups: dict[str, list[str]] = {}
    for s in all_stages:
        if s.curve:
            groups.setdefault(s.curve, []).append(s.targets[1])  # metrics.json: its `history` rows
    label = task_of(p.dataset.name).labels[key.removeprefix("test_")]
    curves = [{f"{key}-{g}": {"title": f"{g}: test {label} (%) by epoch", "x": "epoch",
                              "y": {f: key for f in files}}} for g, files in groups.items()]
    return curves + [str(f) for f in plot_files(p).values()] + [str(f) for f in study_files(p) if f.suffix == ".png"]


HEADER = """\
# Generated from {params} by `tskd dvc write {params}`: do not edit by hand.
# Each stage runs one job of the Snakemake DAG (same grid: tskd/spec/grid.py). Only the keys each
# stage reads are listed, not their values: `dvc exp run -S {params}:<key>=<value>` works as is.
# Regenerate after adding a method, pair, seed or per-pair override; stages refuse to run otherwise.
"""


def render(p: Preset, raw: dict[str, Any], params_file: str, path: Path) -> str:
    """The text of the pipeline file at ``path`` (relative to the repository root)."""
    depth = len(path.parent.parts)
    wdir = "/".join([".."] * depth) if depth else None
    all_stages = stages(p, raw, params_file)
    # Any edit of the params file reruns this check (a plain file dependency), so a grid change
    # that no declared key reflects (an override added) still stops the pipeline.
    check = {"cmd": f"tskd dvc check {params_file} --pipeline {path.as_posix()}", "deps": [params_file]}
    doc: dict[str, Any] = {"stages": {"params-check": ({"wdir": wdir} if wdir else {}) | check}}
    for s in all_stages:
        doc["stages"][s.name] = _stage_dict(s, params_file, wdir)
    doc["plots"] = _plots(p, all_stages)
    body = yaml.safe_dump(doc, sort_keys=False, width=10_000, default_flow_style=False)
    return HEADER.format(params=params_file) + body


def load_raw(params_file: str | Path) -> tuple[Preset, dict[str, Any]]:
    p = load_preset(params_file)
    return p, yaml.safe_load(Path(params_file).read_text())


def write_pipeline(params_file: str, out: Path | None = None) -> Path:
    p, raw = load_raw(params_file)
    path = out or pipeline_path(p)
    atomic_write_text(DEFAULTS_FILE, render_defaults())
    return atomic_write_text(path, render(p, raw, params_file, path))


def check_pipeline(params_file: str, path: Path, root: Path = Path(".")) -> None:
    """Raise ParamsError naming the stages that differ when ``path`` is not what the grid gives,
    or when DEFAULTS_FILE no longer holds the code's defaults."""
    p, raw = load_raw(root / params_file)
    expected = render(p, raw, params_file, path)
    target = root / path
    fix = f"regenerate it: tskd dvc write {params_file}" + (
        "" if path == pipeline_path(p) else f" --out {path}")
    if not target.is_file():
        raise ParamsError(f"{path}: not found; {fix}")
    actual = target.read_text()
    if actual == expected:
        _check_defaults(root, params_file)
        return
    try:
        have = (yaml.safe_load(actual) or {}).get("stages", {}) or {}
    except yaml.YAMLError:
        have = {}
    want = yaml.safe_load(expected)["stages"]
    missing = [s for s in want if s not in have]
    extra = [s for s in have if s not in want]
    changed = [s for s in want if s in have and have[s] != want[s]]
    parts = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
             for label, names in (("missing stages", missing), ("stages no longer in the grid", extra),
                                  ("stages that differ", changed)) if names]
    if not parts:
        diff = difflib.unified_diff(actual.splitlines(), expected.splitlines(), lineterm="", n=0)
        parts = ["first difference: " + next((ln for ln in diff if ln[:1] in "+-" and ln[:3] not in "+++---"), "?")]
    raise ParamsError(f"{path} is out of date with {params_file} ({'; '.join(parts)}); {fix}")


def _check_defaults(root: Path, params_file: str) -> None:
    defaults = root / DEFAULTS_FILE
    if defaults.is_file() and defaults.read_text() == render_defaults():
        return
    have = (yaml.safe_load(defaults.read_text()) or {}) if defaults.is_file() else {}
    code = yaml.safe_load(render_defaults())  # as the file would hold them: tuples are lists there
    changed = sorted(f"{section}.{k}" for section, values in code.items() if isinstance(values, dict)
                     for k, v in values.items() if (have.get(section) or {}).get(k) != v)
    changed += [k for k, v in code.items() if not isinstance(v, dict) and have.get(k) != v]  # results_format
    raise ParamsError(f"{DEFAULTS_FILE} no longer holds the code's defaults (changed: "
                      f"{', '.join(changed[:5]) or 'its layout'}{' ...' if len(changed) > 5 else ''}); "
                      f"regenerate it: tskd dvc write {params_file}")


def check_from_dvc_env(params_file: str) -> None:
    """Inside a DVC stage (DVC_STAGE set), check the pipeline file that stage comes from."""
    addressing = os.environ.get("DVC_STAGE")
    if not addressing:
        return
    root = Path(os.environ.get("DVC_ROOT", ".")).resolve()
    path = Path(addressing.rpartition(":")[0] or "dvc.yaml")
    params = Path(params_file)
    if params.is_absolute() and params.is_relative_to(root):  # Snakemake reports configfiles absolute
        params = params.relative_to(root)
    check_pipeline(params.as_posix(), path, root)
