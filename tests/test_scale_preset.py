"""`tskd scale-preset`: a preset's grid at its real shape (the same jobs) on synthetic data and few epochs,
derived from the preset each time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tskd.spec.config import load_preset, parse_preset
from tskd.spec.grid import student_jobs, student_spec, teacher_spec
from tskd.spec.params_yaml import read_params_yaml
from tskd.spec.scale_preset import ScaleError, derive, job_counts, scaled_milestones

REPO = Path(__file__).resolve().parents[1]


def _shape(p) -> list[tuple]:
    return sorted((j.recipe, j.method, j.pair.teacher, j.pair.student, j.seed) for j in student_jobs(p))


@pytest.mark.parametrize("preset", ["cifar100", "imagenet", "coco", "ablations", "smoke"])
def test_the_derived_grid_has_every_job_of_the_preset_on_synthetic_data(preset):
    original = load_preset(REPO / f"params/{preset}.yaml")
    raw = derive(read_params_yaml(REPO / f"params/{preset}.yaml"))
    derived = parse_preset(raw, "derived")
    assert derived.preset == f"{preset}_scale" and derived.out != original.out
    assert _shape(derived) == _shape(original)
    assert set(derived.teachers) == set(original.teachers)
    assert derived.dataset.synthetic is not None and derived.dataset.root is None
    assert not derived.backbones and all(t.checkpoint is None for t in derived.teachers.values())
    for arch in derived.teachers:
        assert teacher_spec(derived, arch).recipe.epochs == 2
    for job in student_jobs(derived):
        spec = student_spec(derived, job)
        # same architectures, batch sizes and method params, except the epoch-based ones
        full = student_spec(original, job)
        assert (spec.arch, spec.teacher_arch, spec.recipe.batch_size) == (full.arch, full.teacher_arch,
                                                                          full.recipe.batch_size)
        changed = {k for k in full.method_params if full.method_params[k] != spec.method_params[k]}
        assert changed <= {"delta", "warmup", "compile"}, (job, changed)
        if spec.method == "tskd":  # the run reaches a review: k memory nodes, then the review node
            k, delta = spec.method_params["k"], spec.method_params["delta"]
            assert spec.recipe.epochs >= k * delta + 1
        else:
            assert spec.recipe.epochs == 2


def test_the_cifar100_grid_keeps_its_1041_jobs():
    derived = parse_preset(derive(read_params_yaml(REPO / "params/cifar100.yaml")), "derived")
    assert job_counts(derived) == {"all": 1, "data": 1, "teacher": 6, "student": 516, "evaluate": 516, "report": 1}


def test_tskd_variants_that_differ_by_delta_stay_distinct_runs():
    raw = derive(read_params_yaml(REPO / "params/ablations.yaml"))
    m = raw["methods"]
    # deltas 2, 5 (the default), 10 become their ranks 1, 2, 3
    assert (m["tskd_d2"]["delta"], m["tskd"]["delta"], m["tskd_d10"]["delta"]) == (1, 2, 3)
    assert raw["recipes"]["tskd_v1"]["by_method"]["tskd"]["epochs"] == 3 * 3 + 1  # tskd_d10: k 3, delta 3


def test_a_change_to_the_preset_reaches_the_derived_grid():
    raw = read_params_yaml(REPO / "params/cifar100.yaml")
    raw["pairs"].append({"teacher": "resnet56", "student": "resnet8"})
    raw["seeds"] = [7]
    derived = parse_preset(derive(raw), "derived")
    assert ("resnet56", "resnet8") in {(p.teacher, p.student) for p in derived.pairs}
    assert derived.seeds == [7]


def test_a_reduced_grid_keeps_the_first_pairs_seeds_and_recipes_and_only_their_teachers():
    raw = derive(read_params_yaml(REPO / "params/cifar100.yaml"), pairs=2, seeds=1, recipes=1)
    p = parse_preset(raw, "derived")
    assert set(p.teachers) == {"resnet56", "resnet110"} and p.seeds == [0] and p.student_recipes == ["tskd_v1"]
    assert job_counts(p)["student"] == 2 * 8  # every method


def test_milestones_keep_their_place_in_the_run():
    assert scaled_milestones([150, 180, 210], 240, 4) == [2, 3]
    assert scaled_milestones([150, 180, 210], 240, 2) == [1]
    assert scaled_milestones([30], 100, 1) == []


def test_bad_options_and_bad_presets_are_refused_by_name(tmp_path):
    raw = read_params_yaml(REPO / "params/cifar100.yaml")
    with pytest.raises(ScaleError, match="--epochs: at least 1"):
        derive(raw, epochs=0)
    with pytest.raises(ScaleError, match="--pairs: at least 1"):
        derive(raw, pairs=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "params/cifar100.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0, 0]"))
    out = tmp_path / "out.yaml"
    r = run_cli("scale-preset", str(bad), "-o", str(out))
    assert r.returncode == 2 and "seeds: duplicates" in r.stderr and not out.exists(), r.stderr


@pytest.mark.slow
def test_the_command_writes_a_preset_that_tskd_check_accepts(tmp_path):
    out = tmp_path / "scale.yaml"
    r = run_cli("scale-preset", "params/cifar100.yaml", "-o", str(out), "--pairs", "1")
    assert r.returncode == 0, r.stderr
    assert "jobs (1 all, 1 data, 1 teacher, 48 student, 48 evaluate, 1 report)" in r.stdout
    assert out.read_text().startswith("# cifar100_scale: derived from params/cifar100.yaml")
    assert yaml.safe_load(out.read_text())["preset"] == "cifar100_scale"
    check = run_cli("check", str(out))
    assert check.returncode == 0 and "48 student runs" in check.stdout, check.stderr
