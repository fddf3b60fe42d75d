"""Method variants in a preset: several runs of one registered method under names of their own
(``methods.<name>.method``), each its own job, directory, identity, tags and DVC params."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo
from tests.snakemake_runs import snakemake
from tskd.errors import ParamsError
from tskd.spec.config import load_preset, parse_preset
from tskd.spec.grid import student_dir, student_jobs, student_spec
from tskd.tracking import runs as tr
from tskd.workflow.dvc_pipeline import stages

SMOKE = Path(__file__).parents[1] / "params/smoke.yaml"


def _raw(methods: dict) -> dict:
    raw = yaml.safe_load(SMOKE.read_text())
    raw["methods"] = methods
    return raw


VARIANTS = {"kd": {}, "tskd": {"delta": 1, "k": 2}, "tskd_k1": {"method": "tskd", "delta": 1, "k": 1},
            "tskd_rw2": {"method": "tskd", "delta": 1, "k": 2, "review_weight": 2.0}}


def test_each_variant_is_its_own_job_with_the_registered_method_and_its_params():
    p = parse_preset(_raw(VARIANTS))
    jobs = [j for j in student_jobs(p) if j.seed == 0]
    assert [j.method for j in jobs] == list(VARIANTS)  # the preset's order
    specs = {j.method: student_spec(p, j) for j in jobs}
    assert {n: (s.method, s.variant) for n, s in specs.items()} == {
        "kd": ("kd", None), "tskd": ("tskd", None), "tskd_k1": ("tskd", "tskd_k1"), "tskd_rw2": ("tskd", "tskd_rw2")}
    assert specs["tskd_k1"].method_params["k"] == 1 and specs["tskd_k1"].method_params["delta"] == 1
    assert specs["tskd_rw2"].method_params["review_weight"] == 2.0 and specs["tskd"].method_params["k"] == 2
    assert "method" not in specs["tskd_k1"].method_params
    assert student_dir(p, jobs[2]).parts[-4:] == ("student", "tskd_k1", "resnet20-resnet8", "seed0")
    # MLflow: the registered method and the variant's name as tags, one parent group per variant
    tags = tr.run_tags(specs["tskd_k1"], 1, {})
    assert tags["method"] == "tskd" and tags["variant"] == "tskd_k1"
    assert tr.group_name(specs["tskd_k1"]) != tr.group_name(specs["tskd"])
    assert tr.run_tags(specs["kd"], 1, {})["variant"] == "kd"


def test_identity_is_content_not_name():
    # The name is placement: renaming a variant keeps its identity; changing a param changes it.
    p = parse_preset(_raw(VARIANTS))
    renamed = parse_preset(_raw({"kd": {}, "tskd": {"delta": 1, "k": 2},
                                 "k_one": {"method": "tskd", "delta": 1, "k": 1}}))
    spec = {j.method: student_spec(p, j) for j in student_jobs(p) if j.seed == 0}
    spec2 = {j.method: student_spec(renamed, j) for j in student_jobs(renamed) if j.seed == 0}
    assert spec["tskd_k1"].identity() == spec2["k_one"].identity()
    assert spec["tskd_k1"].out_dir != spec2["k_one"].out_dir
    # a variant whose params equal the registered entry's is the registered run itself, so no variant
    assert spec["tskd"].identity() != spec["tskd_k1"].identity()
    ident = spec["tskd_k1"].identity()
    assert ident["method"] == "tskd" and "variant" not in ident and ident["method_params"]["k"] == 1


@pytest.mark.parametrize("methods, expect", [
    ({"tskd_x": {"method": "magic", "k": 2}}, ["methods.tskd_x.method", "unknown method 'magic'", "tskd"]),
    ({"kd": {}, "at": {"method": "kd", "T": 2.0}}, ["methods.at", "cannot take the name of the registered method"]),
    ({"tskd_x": {"method": 3}}, ["methods.tskd_x.method", "must be the name of a registered method"]),
    ({"alone": {"method": "vanilla"}}, ["methods.alone.method", "vanilla"]),
    ({"kd_x": {"method": "kd", "tau": 2}}, ["methods.kd_x.tau"]),
    ({"tskd": {"delta": 1, "k": 2}, "tskd_same": {"method": "tskd", "delta": 1, "k": 2}},
     ["methods.tskd_same", "the same run as methods.tskd"]),
    ({"kd": {}, "kd_default": {"method": "kd", "T": 4.0}}, ["methods.kd_default", "the same run as methods.kd"]),
])
def test_bad_variants_are_named(tmp_path, methods, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_raw(methods)))
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    msg = str(e.value)
    assert str(path) in msg
    for part in expect:
        assert part in msg, msg


def test_a_variants_dvc_stage_declares_its_own_params_and_method():
    raw = _raw(VARIANTS)
    by_name = {s.name: s for s in stages(parse_preset(raw), raw, "params/smoke.yaml")}
    k1 = by_name["train-student-tskd_k1-resnet20-resnet8-seed0"]
    assert "methods.tskd_k1.method" in k1.params and "methods.tskd_k1.k" in k1.params
    assert "methods.tskd.k" not in k1.params  # nothing of another entry
    assert "methods.tskd.review_weight" in k1.defaults  # the registered method's defaults
    assert "methods.tskd_k1.method" not in by_name["train-student-tskd-resnet20-resnet8-seed0"].params


@pytest.mark.slow
def test_dry_run_lists_every_variants_jobs(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / "params/smoke.yaml").write_text(yaml.safe_dump(_raw(VARIANTS), sort_keys=False))
    out = snakemake(repo, "-n", "--configfile", "params/smoke.yaml").stdout
    for name in VARIANTS:
        for seed in (0, 1):
            assert f"results/smoke/students/student/{name}/resnet20-resnet8/seed{seed}/model.pt" in out, name
