"""Params: the shipped presets validate; bad params fail naming the file, the key and what is allowed."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import run_cli
from tskd.config import ParamsError, load_preset
from tskd.grid import student_jobs
from tskd.schema import params_schema


@pytest.mark.parametrize("name", ["smoke", "cifar100"])
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
    (lambda r: r.update(student_recipe="nope"), ["student_recipe", "nope"]),
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
    from tskd.grid import student_spec

    p = load_preset(repo_root / "params/cifar100.yaml")
    by_pair = {pair.name: student_spec(p, "dkd", pair, 0).method_params for pair in p.pairs}
    assert by_pair["resnet56-resnet20"]["beta"] == 2.0
    assert by_pair["wrn_40_2-wrn_16_2"]["beta"] == 6.0
    assert "beta" not in by_pair["resnet32x4-resnet8x4"]  # the method's published default applies


def test_bad_pair_override_is_named(tmp_path):
    path = _write(tmp_path, lambda r: r["pairs"][0].update(methods={"kd": {"tau": 1}}))
    with pytest.raises(ParamsError) as e:
        load_preset(path)
    assert "pairs.0.methods.kd.tau" in str(e.value)
