"""The ablation study (tskd.study): each TSKD variant against the default TSKD, paired over seeds, in
study.md / study.csv and two plots; and the ablations_smoke study end to end through Snakemake."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import copy_repo
from tests.test_report import _metrics, _train_history
from tests.test_workflow import snakemake
from tskd.config import VARIANT_KEY, load_preset, parse_preset
from tskd.dvc_pipeline import stages
from tskd.grid import student_dir, student_jobs, teacher_dir
from tskd.report import write_report
from tskd.study import study_files

REPO = Path(__file__).resolve().parents[1]


def _preset(tmp_path: Path, methods: dict):
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    raw["methods"] = methods
    return parse_preset(raw)


STUDY = {"kd": {}, "tskd": {"delta": 1, "k": 2}, "tskd_k1": {"method": "tskd", "delta": 1, "k": 1},
         "tskd_rw2": {"method": "tskd", "delta": 1, "k": 2, "review_weight": 2.0}}
# best top-1 = 30 + offset. Seeds differ by 5 points for every entry; against tskd (same seed) kd is
# -3 on both seeds, tskd_k1 +1 and +2, tskd_rw2 0 and -1: a paired spread far below the unpaired one.
OFFSET = {"kd": (0.0, 5.0), "tskd": (3.0, 8.0), "tskd_k1": (4.0, 10.0), "tskd_rw2": (3.0, 7.0)}
PRED = {"tskd": 0.5, "tskd_k1": 0.8}  # train_predictability in the review epoch; none for kd and tskd_rw2


def _write_runs(p) -> None:
    d = teacher_dir(p, "resnet20")
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics(_train_history(40, False), False)
                                               | {"method": "vanilla", "seed": 0}))
    for job in student_jobs(p):
        d = student_dir(p, job)
        d.mkdir(parents=True)
        hist = _train_history(OFFSET[job.method][job.seed], p.registered(job.method) == "tskd")
        for r in hist:
            pred = PRED.get(job.method)
            r["train_predictability"] = pred + 0.1 * job.seed if pred is not None and r["epoch"] == 3 else None
        m = _metrics(hist, False) | {"seed": job.seed}
        (d / "metrics.json").write_text(json.dumps(m))
        (d / "eval.json").write_text(json.dumps({"top1": m["last_top1"]}))


def test_study_table_pairs_each_variant_with_tskd_by_seed(tmp_path):
    p = _preset(tmp_path, STUDY)
    _write_runs(p)
    write_report(p)
    rows = list(csv.DictReader((p.out / "study.csv").open()))
    assert [r["variant"] for r in rows] == list(STUDY)  # the preset's order
    by = {r["variant"]: r for r in rows}
    assert by["tskd_k1"]["method"] == "tskd" and by["kd"]["method"] == "kd"
    assert float(by["kd"]["diff_mean"]) == pytest.approx(-3.0) and float(by["kd"]["diff_std"]) == pytest.approx(0.0)
    assert float(by["tskd_k1"]["diff_mean"]) == pytest.approx(1.5)
    assert float(by["tskd_k1"]["diff_std"]) == pytest.approx(0.5 ** 0.5)
    assert float(by["tskd_k1"]["best_std"]) > 4  # unpaired: the seeds' own spread
    assert float(by["tskd_rw2"]["diff_mean"]) == pytest.approx(-0.5) and by["tskd"]["diff_mean"] == ""
    assert float(by["tskd"]["predictability"]) == pytest.approx(0.55)
    assert float(by["tskd_k1"]["predictability"]) == pytest.approx(0.85) and by["kd"]["predictability"] == ""
    md = (p.out / "study.md").read_text()
    assert "| tskd_k1 | tskd | 37.00 ± 4.24 (2) | +1.50 ± 0.71 (2) | 0.850 |" in md
    assert "| kd | kd | 32.50 ± 3.54 (2) | -3.00 ± 0.00 (2) |  |" in md
    assert "| tskd | tskd | 35.50 ± 3.54 (2) | (reference) | 0.550 |" in md
    for png in ("study-accuracy.png", "study-predictability.png"):
        assert Image.open(p.out / "plots" / png).size[0] > 300


def test_no_study_without_tskd_variants(tmp_path):
    p = _preset(tmp_path, {"kd": {}, "tskd": {"delta": 1, "k": 2}})
    _write_runs(p)
    write_report(p)
    assert study_files(p) == [] and not (p.out / "study.md").exists()


def test_the_report_stage_and_rule_declare_the_studys_files(tmp_path):
    raw = yaml.safe_load((REPO / "params/smoke.yaml").read_text()) | {"methods": STUDY}
    p = parse_preset(raw)
    report = next(s for s in stages(p, raw, "params/smoke.yaml") if s.rule == "report")
    files = [str(f) for f in study_files(p)]
    assert len(files) == 4 and set(files) <= set(report.outs)


def test_ablation_presets_validate(tmp_path):
    for name in ("ablations", "ablations_smoke"):
        p = load_preset(REPO / f"params/{name}.yaml")
        assert "tskd" in p.methods and study_files(p)
    full = load_preset(REPO / "params/ablations.yaml")
    assert full.seeds == [0, 1, 2] and [q.name for q in full.pairs] == ["resnet32x4-resnet8x4"]


def test_ablations_smoke_study_end_to_end(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    raw = yaml.safe_load((repo / "params/ablations_smoke.yaml").read_text())
    assert {"target", "sequence", "forecaster"} <= {k for v in raw["methods"].values() for k in v}  # one of each
    start = time.monotonic()
    snakemake(repo, "--configfile", "params/ablations_smoke.yaml")
    print(f"ablations_smoke DAG: {time.monotonic() - start:.0f} s")
    out = repo / "results/ablations_smoke"
    rows = {r["variant"]: r for r in csv.DictReader((out / "study.csv").open())}
    md = (out / "study.md").read_text()
    variants = [n for n in raw["methods"] if n != "tskd"]
    assert variants and list(rows) == list(raw["methods"])
    for name in variants:
        assert rows[name]["paired_n"] == "2" and rows[name]["diff_mean"] != "", rows[name]
    for name, values in raw["methods"].items():  # TSKD's runs measured how predictable the increments were
        if name == "tskd" or values.get(VARIANT_KEY) == "tskd":
            assert float(rows[name]["predictability"]) > 0, rows[name]
        assert f"| {name} | {raw['methods'][name].get(VARIANT_KEY, name)} | " in md
    assert (out / "plots/study-accuracy.png").stat().st_size > 0
    assert (out / "plots/study-predictability.png").stat().st_size > 0
    # The report lists every entry in the preset's order; MLflow has each variant's runs tagged
    # with the registered method and the variant's name, its seeds under a parent of their own.
    best = (out / "report.md").read_text().split("best test top-1")[1]
    at = [best.index(f"| {n} |") for n in raw["methods"]]
    assert at == sorted(at)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tskd-ablations_smoke").experiment_id
    runs = client.search_runs([exp], "tags.run_kind = 'train' and tags.role = 'student'")
    tags = sorted((r.data.tags["variant"], r.data.tags["method"], r.data.tags["seed"]) for r in runs)
    assert tags == sorted((n, raw["methods"][n].get(VARIANT_KEY, n), str(s)) for n in raw["methods"] for s in (0, 1))
    parents = client.search_runs([exp], "tags.run_kind = 'seeds' and tags.role = 'student'")
    assert sorted(r.data.tags["variant"] for r in parents) == sorted(raw["methods"])
