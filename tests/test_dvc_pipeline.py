"""The generated DVC pipeline: current, complete in its params, refused when stale; cache checks."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_cli
from tskd.errors import ParamsError
from tskd.spec import grid
from tskd.spec.config import canonical_json, parse_preset
from tskd.workflow.dvc_pipeline import check_pipeline, pipeline_path, render, stages

REPO = Path(__file__).resolve().parents[1]


def _raw(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "params" / f"{name}.yaml").read_text())


def test_committed_dvc_yaml_is_current():
    # Fails when someone edits params/smoke.yaml's grid, the generator or a default in the code
    # without `tskd dvc write` (dvc.yaml and workflow/defaults.yaml).
    check_pipeline("params/smoke.yaml", Path("dvc.yaml"), root=REPO)


@pytest.mark.slow
def test_every_grid_job_is_a_stage_and_dvc_parses_the_pipeline(tmp_path):
    from dvc.repo import Repo

    raw = _raw("cifar100")
    p = parse_preset(raw)
    names = [s.name for s in stages(p, raw, "params/cifar100.yaml")]
    assert len(names) == len(set(names))
    n_jobs = 1 + len(p.teachers) + 2 * len(grid.student_jobs(p)) + 1  # data, teachers, train+eval, report
    assert len(names) == n_jobs
    # DVC itself reads the 500-stage file from its non-root place (wdir ../..) and builds its DAG.
    shutil.copytree(REPO / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    (tmp_path / "params").mkdir()
    shutil.copy(REPO / "params/cifar100.yaml", tmp_path / "params")
    path = pipeline_path(p)
    assert path == Path("pipelines/cifar100/dvc.yaml")
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(render(p, raw, "params/cifar100.yaml", path))
    with Repo.init(str(tmp_path), no_scm=True, force=True) as repo:
        loaded = {s.name for s in repo.index.stages if s.name}
        assert loaded == set(names) | {"params-check"}
        teacher = next(s for s in repo.index.stages if s.name == "teacher-resnet32x4-seed0")
        assert teacher.wdir == str(tmp_path)
        assert repo.index.graph.number_of_edges() > len(names)


def _leaves(node: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*prefix, k))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, (*prefix, i))]
    return [prefix]


def _perturbed(raw: dict, path: tuple) -> dict | None:
    new = copy.deepcopy(raw)
    node = new
    for k in path[:-1]:
        node = node[k]
    v = node[path[-1]]
    if isinstance(v, bool):
        node[path[-1]] = not v
    elif isinstance(v, int):
        node[path[-1]] = v + 1
    elif isinstance(v, float):
        node[path[-1]] = v * 1.5 + 0.01
    elif isinstance(v, str) and path[-1] in ("precision",):
        node[path[-1]] = "bf16" if v != "bf16" else "fp32"
    else:
        return None
    return new


def _snakemake_params(p) -> dict[str, str]:
    """What each rule of workflow/rules passes as `params:` that Snakemake compares (its rerun
    trigger), by stage: the runs' identities (placement is a derived param, not compared)."""
    out = {"data": canonical_json({"dataset": grid.dataset_for_run(p).model_dump(mode="json")}),
           "report": canonical_json(grid.report_identity(p))}
    for arch, t in p.teachers.items():
        out[f"teacher-{arch}-seed{t.seed}"] = canonical_json(grid.teacher_spec(p, arch).identity()) + str(t.checkpoint)
    for job in grid.student_jobs(p):
        tag = f"{job.recipe}-{job.method}-{grid.student_dir(p, job).parent.name}-seed{job.seed}"
        out[f"train-{tag}"] = out[f"eval-{tag}"] = canonical_json(grid.student_spec(p, job).identity())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smoke", "cifar100", "imagenet", "imagenet_smoke"])
def test_declared_params_are_exactly_what_snakemake_reruns_for(preset):
    """For every value in the params file: the stages DVC reruns (a declared key covers it) are
    the jobs whose Snakemake params change. Values that change the grid's shape are skipped:
    they make dvc.yaml stale, which the next test covers."""
    raw = _raw(preset)
    p = parse_preset(raw)
    base = _snakemake_params(p)
    declared = {s.name: s.params for s in stages(p, raw, f"params/{preset}.yaml")}
    # Neither the MLflow experiment nor the evaluation batch size changes a result: nothing reruns.
    renamed = copy.deepcopy(raw) | {"tracking": {"experiment": "renamed"}}
    renamed["train"] = dict(raw.get("train", {}), eval_batch_size=99)
    assert _snakemake_params(parse_preset(renamed)) == base
    checked = 0
    for path in _leaves(raw):
        new = _perturbed(raw, path)
        if new is None:
            continue
        try:
            q = parse_preset(new)
        except ParamsError:
            continue
        after = _snakemake_params(q)
        if after.keys() != base.keys():
            continue
        key = ".".join(map(str, path))
        snakemake_reruns = {n for n in base if after[n] != base[n]}
        dvc_reruns = {n for n, keys in declared.items()
                      if keys is None or any(key == k or key.startswith(k + ".") for k in keys)}
        assert dvc_reruns == snakemake_reruns, key
        checked += 1
    assert checked > 20


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["smoke", "cifar100", "imagenet_smoke"])
def test_declared_defaults_are_what_snakemake_reruns_for(preset, monkeypatch):
    """For every default the code fills in, changed in place (as a new version of tskd would): the
    stages that declare it in workflow/defaults.yaml are exactly the jobs whose Snakemake params
    change. A default that the params file overrides for a job reruns neither."""
    from pydantic.fields import FieldInfo

    from tskd.distill.registry import list_methods, method_class
    from tskd.spec.config import DATASET_MODELS, SYNTHETIC_MODELS, Preset, RecipeCfg, TrainCfg
    from tskd.workflow.dvc_pipeline import code_defaults

    raw = _raw(preset)
    p = parse_preset(raw)
    base = _snakemake_params(p)
    all_stages = stages(p, raw, f"params/{preset}.yaml")
    models = {"recipe": RecipeCfg, "train": TrainCfg, **{f"datasets.{f}": m for f, m in DATASET_MODELS.items()},
              **{f"synthetic.{f}": m for f, m in SYNTHETIC_MODELS.items()}}
    models |= {f"methods.{m}": method_class(m).Params for m in list_methods()}
    checked = 0
    for section, model in models.items():
        defaults = code_defaults()
        for part in section.split("."):
            defaults = defaults[part]
        for key, value in defaults.items():
            new = _perturbed({key: value}, (key,))
            if new is None:
                continue
            field = model.model_fields[key]
            monkeypatch.setitem(model.model_fields, key, FieldInfo.merge_field_infos(field, default=new[key]))
            for m in (model, *DATASET_MODELS.values(), Preset):
                m.model_rebuild(force=True)
            try:
                after = _snakemake_params(parse_preset(raw))
            finally:
                monkeypatch.setitem(model.model_fields, key, field)
                for m in (model, *DATASET_MODELS.values(), Preset):
                    m.model_rebuild(force=True)
            # The report reruns after any job it reads in both; its own trigger is the preset as written.
            snakemake_reruns = {n for n in base if after[n] != base[n]} - {"report"}
            dvc_reruns = {s.name for s in all_stages if f"{section}.{key}" in s.defaults}
            assert dvc_reruns == snakemake_reruns, f"{section}.{key}"
            checked += bool(snakemake_reruns)
    assert checked > 20
    assert _snakemake_params(parse_preset(raw)) == base  # every default restored


@pytest.mark.parametrize("preset", ["smoke", "ablations_smoke"])
def test_a_new_results_format_reruns_every_run_in_both(preset, monkeypatch):
    """What a run writes (tskd.spec.grid.RESULTS_FORMAT) is part of every run's identity: a new version
    reruns every training and evaluation job in Snakemake, and DVC's stages declare it."""
    from tskd.workflow.dvc_pipeline import code_defaults

    raw = _raw(preset)
    p = parse_preset(raw)
    base = _snakemake_params(p)
    monkeypatch.setattr(grid, "RESULTS_FORMAT", grid.RESULTS_FORMAT + 1)
    after = _snakemake_params(p)
    runs = {n for n in base if n.split("-")[0] in ("teacher", "train", "eval")}
    assert runs and {n for n in base if after[n] != base[n]} == runs
    assert code_defaults()["results_format"] == grid.RESULTS_FORMAT
    assert {s.name for s in stages(p, raw, f"params/{preset}.yaml") if "results_format" in s.defaults} == runs


@pytest.mark.slow
def test_stale_pipeline_names_the_stages_and_the_fix(tmp_path):
    from tskd.workflow.dvc_pipeline import DEFAULTS_FILE, render_defaults

    (tmp_path / "params").mkdir()
    raw = _raw("smoke")
    p = parse_preset(raw)
    (tmp_path / "dvc.yaml").write_text(render(p, raw, "params/smoke.yaml", Path("dvc.yaml")))
    (tmp_path / DEFAULTS_FILE).parent.mkdir()
    (tmp_path / DEFAULTS_FILE).write_text(render_defaults())
    raw["seeds"] = [0, 1, 2]
    (tmp_path / "params/smoke.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "dvc.yaml is out of date with params/smoke.yaml" in r.stderr
    assert "missing stages: train-student-vanilla-resnet8-seed2, train-student-kd-resnet20-resnet8-seed2" in r.stderr
    assert "tskd dvc write params/smoke.yaml" in r.stderr
    # A per-pair override changes which keys the stages read, so it too needs a new dvc.yaml.
    raw["seeds"] = [0, 1]
    raw["pairs"][0]["methods"] = {"kd": {"T": 2.0}}
    (tmp_path / "params/smoke.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "stages that differ: train-student-kd-resnet20-resnet8-seed0" in r.stderr
    assert run_cli("dvc", "write", "params/smoke.yaml", cwd=tmp_path).returncode == 0
    assert "pairs.0.methods.kd" in (tmp_path / "dvc.yaml").read_text()
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # A default changed in the code (here: the file edited to look so) needs a new defaults file.
    text = (tmp_path / DEFAULTS_FILE).read_text()
    (tmp_path / DEFAULTS_FILE).write_text(text.replace("    T: 4.0\n", "    T: 3.0\n", 1))
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 2 and f"{DEFAULTS_FILE} no longer holds the code's defaults" in r.stderr, r.stderr
    assert "changed: methods." in r.stderr and "tskd dvc write params/smoke.yaml" in r.stderr
    # Written by an earlier tskd whose runs wrote another results format: named alone, no other key.
    old = text.replace(f"results_format: {grid.RESULTS_FORMAT}\n", f"results_format: {grid.RESULTS_FORMAT - 1}\n")
    assert old != text
    (tmp_path / DEFAULTS_FILE).write_text(old)
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "(changed: results_format)" in r.stderr, r.stderr
    (tmp_path / DEFAULTS_FILE).write_text(text)
    (tmp_path / "dvc.yaml").unlink()
    r = run_cli("dvc", "check", "params/smoke.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "dvc.yaml: not found" in r.stderr


def _cache_object(root: Path, data: bytes) -> tuple[str, Path]:
    md5 = hashlib.md5(data).hexdigest()
    obj = root / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(data)
    obj.chmod(0o444)  # as DVC leaves them: read-only, which makes DVC trust the file unread
    return md5, obj


def test_verify_names_corrupt_cache_files_and_differing_outputs(tmp_path):
    from tskd.workflow.dvc_verify import remove_corrupt, verify

    good, bad = b"model weights", b"metrics"
    md5_good, _ = _cache_object(tmp_path, good)
    md5_bad, obj_bad = _cache_object(tmp_path, bad)
    lock = {"schema": "2.0", "stages": {"train": {"cmd": "x", "outs": [
        {"path": "out/model.pt", "md5": md5_good, "hash": "md5"},
        {"path": "out/metrics.json", "md5": md5_bad, "hash": "md5"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    (tmp_path / "out").mkdir()
    (tmp_path / "out/model.pt").write_bytes(good)
    (tmp_path / "out/metrics.json").write_bytes(bad)
    assert verify(tmp_path) == []

    obj_bad.chmod(0o644)
    obj_bad.write_bytes(b"metricz")  # same size: only a hash tells
    obj_bad.chmod(0o444)
    (tmp_path / "out/model.pt").write_bytes(b"retrained")
    problems = verify(tmp_path)
    assert [(pr.kind, pr.path) for pr in problems] == [
        ("output differs from the lock", "out/model.pt"), ("corrupt cache", str(obj_bad.relative_to(tmp_path)))]
    assert "dvc.lock:train" in problems[1].owner and "out/metrics.json" in problems[1].owner
    r = run_cli("dvc", "verify", cwd=tmp_path)
    assert r.returncode == 2 and "corrupt cache" in r.stderr and str(obj_bad.relative_to(tmp_path)) in r.stderr
    assert remove_corrupt(problems, tmp_path) == [str(obj_bad.relative_to(tmp_path))] and not obj_bad.exists()
