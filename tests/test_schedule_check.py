"""`tskd check` judges a method's schedule by the epochs its runs train: the recipe with the
``by_method`` values of the entry's registered method (a variant's too), as the jobs do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[1]


def _preset(tmp_path: Path, name: str, edit) -> Path:
    # The smoke preset: 3 student epochs, TSKD at delta 1 and k 2 (memory nodes 0 and 1, review at 2).
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    edit(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _refused(path: Path) -> str:
    r = run_cli("check", str(path))
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    return " ".join(r.stderr.split())


@pytest.mark.slow
def test_by_method_epochs_without_a_review_are_refused(tmp_path):
    def two_epochs_for_tskd(raw):
        raw["recipes"]["student"]["by_method"] = {"tskd": {"epochs": 2}}

    path = _preset(tmp_path, "short_tskd", two_epochs_for_tskd)
    err = _refused(path)
    assert err.startswith(f"tskd check: error: {path}: methods.tskd, recipe student: "), err
    assert "the schedule has no review epoch: methods.tskd.k=2" in err
    assert "Allowed: methods.tskd.k <= 1 or at least 3 epochs" in err
    assert "recipes.student.by_method.tskd.epochs=2 epochs, not recipes.student.epochs=3" in err


@pytest.mark.slow
def test_a_variant_follows_the_by_method_of_its_registered_method(tmp_path):
    def variant_without_a_review(raw):
        raw["recipes"]["student"]["by_method"] = {"tskd": {"epochs": 2}}
        raw["methods"]["tskd"] = {"delta": 1, "k": 1}  # fits 2 epochs: node 0 memory, node 1 review
        raw["methods"]["tskd_k2"] = {"method": "tskd", "delta": 1, "k": 2}

    path = _preset(tmp_path, "short_variant", variant_without_a_review)
    err = _refused(path)
    assert f"{path}: methods.tskd_k2 (a variant of tskd), recipe student:" in err, err
    assert "methods.tskd_k2.k=2 memory nodes fill all 2 node(s)" in err
    assert "Allowed: methods.tskd_k2.k <= 1 or at least 3 epochs" in err
    assert "recipes.student.by_method.tskd.epochs=2 epochs" in err
    assert "by_method of its registered method tskd" in err
    assert "change that key or the params of methods.tskd_k2" in err


@pytest.mark.slow
def test_by_method_epochs_that_fit_are_accepted(tmp_path):
    def longer_for_tskd(raw):
        # The recipe's 2 epochs would leave k=2 without a review; TSKD and its variant train 4.
        raw["recipes"]["student"].update(epochs=2, milestones=[1], by_method={"tskd": {"epochs": 4}})
        raw["methods"]["tskd_k3"] = {"method": "tskd", "delta": 1, "k": 3}

    path = _preset(tmp_path, "long_tskd", longer_for_tskd)
    r = run_cli("check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: ok")
