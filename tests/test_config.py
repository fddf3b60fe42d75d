"""Params: the shipped presets validate; bad params fail naming the file, the key and what is allowed."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from tskd.errors import ParamsError
from tskd.spec.config import load_preset
from tskd.spec.grid import student_jobs
from tskd.spec.schema import params_schema


@pytest.mark.parametrize("name", ["smoke", "cifar100", "imagenet", "imagenet_smoke"])
def test_presets_validate(repo_root, name):
    p = load_preset(repo_root / "params" / f"{name}.yaml")
    assert p.preset == name and student_jobs(p)


def test_cifar100_has_the_eleven_pairs(repo_root):
    p = load_preset(repo_root / "params/cifar100.yaml")
    assert len(p.pairs) == 11 and p.seeds == [0, 1, 2]
    assert {"tskd_v1", "mdistiller"} <= set(p.recipes)


def _write(tmp_path, mutate):
    raw = yaml.safe_load((__import__("pathlib").Path(__file__).parents[1] / "params/smoke.yaml").read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r["recipes"]["student"].update(lrate=0.1), ["recipes.student.lrate", "unknown key"]),
    (lambda r: r["recipes"]["student"].update(epochs="many"), ["recipes.student.epochs", "integer"]),
    (lambda r: r.update(colour="red"), ["colour", "unknown key"]),
    (lambda r: r["methods"]["kd"].update(temperature=4), ["methods.kd.temperature", "allowed keys: T"]),
    (lambda r: r["methods"]["kd"].update(T="hot"), ["methods.kd.T"]),
    (lambda r: r["methods"].update(magic={}), ["methods.magic", "unknown method", "kd"]),
    (lambda r: r["pairs"][0].update(student="resnet9000"), ["pairs.0.student", "resnet9000", "resnet8"]),
    (lambda r: r.update(student_recipe="nope"), ["student_recipe", "renamed `student_recipes`", "nope"]),
    (lambda r: r.update(student_recipes=["nope"]), ["student_recipes.0", "unknown recipe 'nope'"]),
    (lambda r: r["recipes"]["student"].update(methods={"magic": {}}), ["recipes.student.methods.magic"]),
    (lambda r: r["recipes"]["student"].update(methods={"kd": {"tau": 1}}), ["recipes.student.methods.kd.tau"]),
])
def test_bad_params_are_named(tmp_path, mutate, expect):
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    msg = str(e.value)
    assert str(path) in msg
    for part in expect:
        assert part in msg, msg


def test_check_cli_exits_non_zero_on_bad_params(tmp_path):
    path = _write(tmp_path, lambda r: r["recipes"]["student"].update(lrate=0.1))
    r = run_cli("check", str(path))
    assert r.returncode == 2
    assert "recipes.student.lrate" in r.stderr and str(path) in r.stderr
    assert "Traceback" not in r.stderr


def test_committed_schema_is_current(repo_root):
    committed = json.loads((repo_root / "workflow/schemas/params.schema.json").read_text())
    assert committed == params_schema(), "run `tskd schema` and commit workflow/schemas/params.schema.json"


def test_pair_overrides_reach_only_that_pairs_spec(repo_root):
    from tskd.distill.methods.dkd import DKDParams
    from tskd.spec.grid import StudentJob, student_spec

    p = load_preset(repo_root / "params/cifar100.yaml")
    by_pair = {pair.name: student_spec(p, StudentJob("tskd_v1", "dkd", pair, 0)).method_params for pair in p.pairs}
    assert by_pair["resnet56-resnet20"]["beta"] == 2.0
    assert by_pair["wrn_40_2-wrn_16_2"]["beta"] == 6.0
    # The method's published default applies, and the spec says so: a run's identity holds every value.
    assert by_pair["resnet32x4-resnet8x4"]["beta"] == DKDParams().beta
    assert set(by_pair["resnet32x4-resnet8x4"]) == set(DKDParams.model_fields)


def test_recipe_method_params_sit_between_the_preset_and_the_pair(tmp_path):
    from tskd.spec.grid import StudentJob, student_jobs, student_spec

    def mutate(r):
        r["recipes"]["other"] = dict(r["recipes"]["student"], methods={"kd": {"ce_weight": 0.1, "kd_weight": 0.9}})
        r["student_recipes"] = ["student", "other"]
        r["pairs"].append({"teacher": "resnet20", "student": "resnet14", "methods": {"kd": {"kd_weight": 0.5}}})

    p = load_preset(_write(tmp_path, mutate))
    pair, overridden = p.pairs
    kd = {(j.recipe, j.pair.name): student_spec(p, j).method_params for j in student_jobs(p) if j.method == "kd"}
    assert kd[("student", pair.name)] | {"T": 4.0} == {"T": 4.0, "ce_weight": 1.0, "kd_weight": 1.0}
    assert kd[("other", pair.name)]["ce_weight"] == 0.1 and kd[("other", pair.name)]["kd_weight"] == 0.9
    assert kd[("other", overridden.name)]["ce_weight"] == 0.1 and kd[("other", overridden.name)]["kd_weight"] == 0.5
    # Each recipe's runs have their own directory, and the spec names the recipe.
    dirs = {student_spec(p, j).out_dir for j in student_jobs(p)}
    assert len(dirs) == len(student_jobs(p))
    spec = student_spec(p, StudentJob("other", "kd", pair, 0))
    assert "/students/other/kd/" in spec.out_dir and spec.recipe_name == "other"


def test_student_alone_with_conflicting_overrides_is_refused(tmp_path):
    def mutate(r):
        r["pairs"] = [{"teacher": "resnet20", "student": "resnet8", "methods": {"vanilla": {"ce_weight": 0.5}}},
                      {"teacher": "resnet20", "student": "resnet8"}]

    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    msg = str(e.value)
    assert str(path) in msg and "pairs.0" in msg and "pairs.1" in msg and "'resnet8'" in msg, msg


def test_milestones_at_or_after_the_epoch():
    from tskd.spec.config import RecipeCfg

    at = RecipeCfg(epochs=240, batch_size=64, lr=0.1, milestones=[150, 180, 210])
    after = at.model_copy(update={"milestone_mode": "after"})
    assert [at.lr_at(0.1, e) for e in (149, 150, 151)] == pytest.approx([0.1, 0.01, 0.01])
    # The TSKD/ReviewKD authors' lr_schedule decays at the end of epoch 150: epoch 151 is the first.
    assert [after.lr_at(0.1, e) for e in (149, 150, 151, 181, 211)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 1e-4])


def test_cifar100_recipes_follow_their_sources(repo_root):
    p = load_preset(repo_root / "params/cifar100.yaml")
    assert p.student_recipes == ["tskd_v1", "mdistiller"]
    v1, md = p.recipes["tskd_v1"], p.recipes["mdistiller"]
    assert v1.milestone_mode == "after" and md.milestone_mode == "at"
    assert v1.teacher_input == "student" and v1.normalization == "cifar10"
    assert md.methods["kd"] == {"ce_weight": 0.1, "kd_weight": 0.9}


def test_bad_pair_override_is_named(tmp_path):
    path = _write(tmp_path, lambda r: r["pairs"][0].update(methods={"kd": {"tau": 1}}))
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    assert "pairs.0.methods.kd.tau" in str(e.value)


def test_recipe_values_per_method(repo_root, tmp_path):
    """mdistiller's ImageNet recipe: KD, AT, DKD at batch 512 and lr 0.2, CRD and ReviewKD at 256 and 0.1."""
    from tskd.spec.grid import student_jobs, student_spec

    p = load_preset(repo_root / "params/imagenet.yaml")
    recipes = {(j.method, j.pair.student): student_spec(p, j).recipe for j in student_jobs(p)}
    assert (recipes[("kd", "resnet18")].batch_size, recipes[("kd", "resnet18")].lr) == (512, 0.2)
    assert (recipes[("crd", "resnet18")].batch_size, recipes[("crd", "resnet18")].lr) == (256, 0.1)
    assert recipes[("crd", "MobileNetV1")].milestones == [30, 60, 90] and not recipes[("crd", "resnet18")].by_method
    kd = next(student_spec(p, j) for j in student_jobs(p) if j.method == "kd")
    assert (kd.method_params["T"], kd.method_params["ce_weight"], kd.method_params["kd_weight"]) == (1.0, 0.5, 0.5)

    for bad, words in (({"crd": {"batch": 1}}, ["by_method.crd", "batch"]),
                       ({"crd": {"lr": -1}}, ["by_method.crd.lr"]),
                       ({"magic": {"lr": 0.1}}, ["recipes.student.by_method.magic"])):
        path = _write(tmp_path, lambda r, bad=bad: r["recipes"]["student"].update(by_method=bad))
        with pytest.raises(ParamsError) as e:
            load_preset(path)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_linear_warmup_factor_per_step():
    from tskd.spec.config import RecipeCfg

    r = RecipeCfg(epochs=2, batch_size=2, lr=0.02, warmup_iters=1000)
    assert r.warmup_at(0) == pytest.approx(0.001) and r.warmup_at(500) == pytest.approx(0.5005)
    assert r.warmup_at(1000) == 1.0 and r.warmup_at(5000) == 1.0
    assert RecipeCfg(epochs=2, batch_size=2, lr=0.02).warmup_at(0) == 1.0  # none by default


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r["recipes"]["student"].update(batch_size="64"), ["recipes.student.batch_size", "integer", "'64'"]),
    (lambda r: r["recipes"]["student"].update(nesterov="yes"), ["recipes.student.nesterov", "boolean", "'yes'"]),
    (lambda r: r["recipes"]["student"].update(epochs=3.0), ["recipes.student.epochs", "integer"]),
    (lambda r: r["methods"]["kd"].update(T="4"), ["methods.kd.T", "number", "'4'"]),
    (lambda r: r["train"].update(deterministic="true"), ["train.deterministic", "boolean"]),
    (lambda r: r["recipes"]["student"].update(by_method={"kd": {"batch_size": "32"}}),
     ["recipes.student", "by_method.kd.batch_size", "integer"]),
])
def test_strings_are_not_coerced_to_numbers_or_booleans(tmp_path, mutate, expect):
    """pydantic's default mode would take "64" as 64 and "yes" as True: tskd check accepted what Snakemake's
    JSON-schema step then refused. Strict types, one answer everywhere."""
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for part in expect:
        assert part in msg, msg


def test_strict_types_accept_what_yaml_naturally_gives(tmp_path):
    # An int for a float field, a list for a tuple field (augment, TSKD's taps).
    def mutate(r):
        r["recipes"]["student"].update(lr=1, weight_decay=0, augment=["flip"])
        r["methods"]["tskd"].update(taps=[0, 1], T=4)

    p = load_preset(_write(tmp_path, mutate))
    assert p.recipes["student"].lr == 1.0 and isinstance(p.recipes["student"].lr, float)
    assert p.recipes["student"].augment == ("flip",)


@pytest.mark.parametrize("text, expect", [
    ("seeds: [0]\n", ["line 4", "'seeds' given twice", "first at line 3"]),
    ("  epochs: 9\n", ["line 5", "'epochs' given twice", "first at line 4"]),
])
def test_a_key_given_twice_is_refused_with_its_line(tmp_path, text, expect):
    """YAML (and Snakemake's --configfile) keep the last of two equal keys without a word."""
    path = tmp_path / "dup.yaml"
    base = "preset: dup\nseeds: [0]\n" if text.startswith("seeds") else "preset: dup\nrecipes:\n  epochs: 3\n"
    path.write_text("# a comment\n" + base + text)
    r = run_cli("check", str(path))
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr and "Traceback" not in r.stderr, r.stderr
    for part in expect:
        assert part in r.stderr, r.stderr


@pytest.mark.slow
def test_tskd_train_refuses_a_spec_with_a_string_number_or_a_key_twice(repo_root, tmp_path):
    """What reaches `tskd train` is judged as strictly as the params file (not coerced, then trained on)."""
    from tskd.spec.grid import teacher_spec

    spec = teacher_spec(load_preset(repo_root / "params/smoke.yaml"), "resnet20").model_dump(mode="json")
    spec["out_dir"] = str(tmp_path / "run")
    spec["recipe"]["batch_size"] = "64"
    r = run_cli("train", "--no-track", "--spec", json.dumps(spec))
    assert r.returncode == 2 and "--spec" in r.stderr and "recipe.batch_size" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()

    spec["recipe"]["batch_size"] = 64
    text = json.dumps(spec)
    r = run_cli("train", "--no-track", "--spec", text[:-1] + ', "seed": 3}')
    assert r.returncode == 2 and "--spec" in r.stderr and "'seed' given twice" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_job_named_by_preset_file_and_run_directory_gets_the_grids_spec(repo_root, tmp_path):
    """What the workflow's rules pass (--preset FILE --job DIR): the job's spec is the grid's, and a
    directory that is no job of the preset is refused by name."""
    from tskd.spec.config import canonical_json
    from tskd.spec.grid import student_dir, student_spec
    from tskd.workflow.job_spec import spec_of_job, write_preset

    raw = yaml.safe_load((repo_root / "params/smoke.yaml").read_text())
    path = write_preset(raw, tmp_path)
    assert write_preset(raw, tmp_path) == path and json.loads(path.read_text()) == raw
    p = load_preset(repo_root / "params/smoke.yaml")
    job = student_jobs(p)[3]
    assert canonical_json(spec_of_job(path, student_dir(p, job))) == canonical_json(student_spec(p, job))

    r = run_cli("train", "--preset", str(path), "--job", "results/smoke/students/nope/seed0")
    assert r.returncode == 2 and "--job results/smoke/students/nope/seed0" in r.stderr, r.stderr
