"""The ablation study (tskd.reporting.study): each TSKD variant against the default TSKD, paired over seeds, in
study.md / study.csv and three plots, with each entry's time ÷ KD's; and the ablations_smoke study end
to end through Snakemake."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from scipy import stats

from tests.conftest import copy_repo
from tests.snakemake_runs import snakemake
from tests.test_report import _metrics, _train_history
from tskd.distill.tskd.schedule import summarize_schedule
from tskd.engine.evolution import EVOLUTION_FILE, read_evolution
from tskd.reporting.plots.runs import read_runs
from tskd.reporting.report import write_report
from tskd.reporting.study import cost_panels, study_files, study_rows, tskd_params, varied_only_in
from tskd.spec.config import VARIANT_KEY, load_preset, parse_preset
from tskd.spec.grid import student_dir, student_jobs, teacher_dir
from tskd.workflow.dvc_pipeline import stages

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
# Seconds per epoch: kd's grow with the epoch e and the seed s, e * (1 + s), so the epochs that a ratio
# compares matter. A TSKD entry takes FACTOR times kd's in its review epochs (REVIEWS: train_review
# is set there only) and kd's + 0.5 s (a snapshot) in the others. tskd_rw2 never reviews.
FACTOR = {"tskd": 2.0, "tskd_k1": 1.5, "tskd_rw2": 3.0}
REVIEWS = {"tskd": (3,), "tskd_k1": (2, 3), "tskd_rw2": ()}


def _kd_seconds(epoch: int, seed: int) -> float:
    return epoch * (1.0 + seed)


def _write_runs(p, factor: dict = FACTOR, reviews: dict = REVIEWS) -> None:
    d = teacher_dir(p, "resnet20")
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(_metrics(_train_history(40, False), False)
                                               | {"method": "vanilla", "seed": 0}))
    for job in student_jobs(p):
        d = student_dir(p, job)
        d.mkdir(parents=True)
        tskd = p.registered(job.method) == "tskd"
        hist = _train_history(OFFSET.get(job.method, (0.0, 0.0))[job.seed], tskd)
        for r in hist:
            pred = PRED.get(job.method)
            r["train_predictability"] = pred + 0.1 * job.seed if pred is not None and r["epoch"] == 3 else None
            kd = _kd_seconds(r["epoch"], job.seed)
            review = tskd and r["epoch"] in reviews[job.method]
            if tskd:
                r["train_review"] = 0.25 if review else None
            r["seconds"] = kd * factor[job.method] if review else kd + 0.5 if tskd else kd
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
    # Paired over two seeds: the 95% interval is mean ± t(0.975, 1 df) × sd / √2 (scipy's ttest_rel
    # gives p = 0.205 for differences 1 and 2, 0.070 for 4 and 5); a constant difference is certain.
    assert ("| tskd_k1 | tskd | 37.00 ± 4.24 (2) | +1.50 [-4.85, +7.85] (2) | 0.205 | +4.50 [-1.85, +10.85] (2) | "
            "0.070 | 0.850 | 1.50 | 1.47 |") in md
    assert "| kd | kd | 32.50 ± 3.54 (2) | **-3.00 [-3.00, -3.00]** (2) | < 0.001 | (reference) |  |  |  | 1.00 |" in md
    assert ("| tskd | tskd | 35.50 ± 3.54 (2) | (reference) |  | **+3.00 [+3.00, +3.00]** (2) | < 0.001 | 0.550 | "
            "2.00 | 1.61 |") in md
    assert float(by["tskd_k1"]["diff_p"]) == pytest.approx(stats.ttest_rel([34, 40], [33, 38]).pvalue)
    assert float(by["tskd_k1"]["kd_diff_low"]) == pytest.approx(
        stats.ttest_rel([34, 40], [30, 35]).confidence_interval(0.95).low)
    assert "wall-clock times of the runs themselves" in md and "benchmarks/bench_ablations.py" in md
    # Each TSKD entry links its runs' feature-map evolution grids; KD has none.
    assert ("- tskd_k1 (resnet20-resnet8, recipe student): [seed 0](plots/evolution/student-resnet20-resnet8-tskd_k1-"
            "seed0.png), [seed 1](plots/evolution/student-resnet20-resnet8-tskd_k1-seed1.png)") in md
    assert "- kd (" not in md
    for png in ("study-accuracy.png", "study-predictability.png", "study-cost.png"):
        assert Image.open(p.out / "plots" / png).size[0] > 300


def test_cost_columns_divide_each_entrys_times_by_kds(tmp_path):
    p = _preset(tmp_path, STUDY)
    _write_runs(p)
    write_report(p)
    by = {r["variant"]: r for r in csv.DictReader((p.out / "study.csv").open())}
    # kd's runs: 1+2+3 = 6 s and 12 s, a mean of 9; its epoch 3: 3 and 6 s; its epochs 2 and 3: 2, 3, 4, 6 s.
    # A review epoch costs FACTOR × kd's at that epoch, whichever seed: the ratio is FACTOR (against kd's
    # mean over all its epochs, 3 s, tskd's would read 3.0).
    assert float(by["tskd"]["review_epoch_ratio"]) == pytest.approx(2.0)
    assert float(by["tskd_k1"]["review_epoch_ratio"]) == pytest.approx(1.5)
    # Whole runs: tskd (1.5 + 2.5 + 6) and (2.5 + 4.5 + 12) s; tskd_k1 (1.5 + 3 + 4.5) and (2.5 + 6 + 9) s;
    # tskd_rw2, no review, (1.5 + 2.5 + 3.5) and (2.5 + 4.5 + 6.5) s.
    assert float(by["tskd"]["run_ratio"]) == pytest.approx(14.5 / 9)
    assert float(by["tskd_k1"]["run_ratio"]) == pytest.approx(13.25 / 9)
    assert float(by["tskd_rw2"]["run_ratio"]) == pytest.approx(10.5 / 9)
    assert float(by["kd"]["run_ratio"]) == 1.0
    assert by["kd"]["review_epoch_ratio"] == "" and by["tskd_rw2"]["review_epoch_ratio"] == ""  # no review epoch
    # The curves: k through tskd (k 2) and tskd_k1; δ has tskd alone (tskd_rw2 changes another param).
    k, delta = cost_panels(p, study_rows(p, read_runs(p)))
    label = f"{p.pairs[0].name}, recipe {p.student_recipes[0]}"
    assert k.curves == {label: [(1, pytest.approx(1.5)), (2, pytest.approx(2.0))]}
    assert delta.curves == {label: [(1, pytest.approx(14.5 / 9))]}
    assert delta.note == "the preset varies only δ from tskd in fewer than two entries"


def test_no_cost_without_kd(tmp_path):
    p = _preset(tmp_path, {k: v for k, v in STUDY.items() if k != "kd"})
    _write_runs(p)
    write_report(p)
    rows = list(csv.DictReader((p.out / "study.csv").open()))
    assert [r["variant"] for r in rows] == ["tskd", "tskd_k1", "tskd_rw2"]
    assert all(r["review_epoch_ratio"] == "" and r["run_ratio"] == "" for r in rows)
    assert Image.open(p.out / "plots" / "study-cost.png").size[0] > 300  # drawn, with its notes


def test_cost_curves_follow_the_entries_that_change_one_param():
    def entry(k: int, delta: int, target: str = "dynamic") -> dict:
        return {"k": k, "delta": delta, "target": target}

    params = {"tskd": entry(3, 5), "tskd_k4": entry(4, 5), "tskd_k1": entry(1, 5), "tskd_d2": entry(3, 2),
              "tskd_k1d2": entry(1, 2), "tskd_s": entry(3, 5, "static")}  # k1d2 changes two: on neither curve
    assert varied_only_in(params, "k") == ["tskd_k1", "tskd", "tskd_k4"]
    assert varied_only_in(params, "delta") == ["tskd_d2", "tskd"]
    assert varied_only_in(params, "target") == ["tskd", "tskd_s"]


def test_cost_panels_draw_k_and_delta(tmp_path):
    # smoke's 3 student epochs: δ 2 has a review with k 1 (nodes at epochs 0 and 2), so this study
    # varies both; tskd_k2 keeps tskd's δ, tskd_d2 its k.
    methods = {"kd": {}, "tskd": {"delta": 1, "k": 1}, "tskd_k2": {"method": "tskd", "delta": 1, "k": 2},
               "tskd_d2": {"method": "tskd", "delta": 2, "k": 1}}
    p = _preset(tmp_path, methods)
    _write_runs(p, {"tskd": 2.0, "tskd_k2": 2.5, "tskd_d2": 2.0}, {"tskd": (2,), "tskd_k2": (3,), "tskd_d2": (3,)})
    rows = study_rows(p, read_runs(p))
    k, delta = cost_panels(p, rows)
    label = f"{p.pairs[0].name}, recipe {p.student_recipes[0]}"
    assert (k.param, delta.param) == ("k", "δ")
    assert k.curves == {label: [(1, pytest.approx(2.0)), (2, pytest.approx(2.5))]}
    # Whole runs: tskd reviews at epoch 2, tskd_d2 at epoch 3 (kd's longest): (1.5 + 4 + 3.5) and
    # (2.5 + 8 + 6.5) s against (1.5 + 2.5 + 6) and (2.5 + 4.5 + 12) s.
    assert delta.curves == {label: [(1, pytest.approx(13 / 9)), (2, pytest.approx(14.5 / 9))]}


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
    assert len(files) == 5 and set(files) <= set(report.outs)


def test_ablation_presets_validate(tmp_path):
    for name in ("ablations", "ablations_smoke"):
        p = load_preset(REPO / f"params/{name}.yaml")
        assert "tskd" in p.methods and study_files(p)
    full = load_preset(REPO / "params/ablations.yaml")
    assert full.seeds == [0, 1, 2] and [q.name for q in full.pairs] == ["resnet32x4-resnet8x4"]
    params = tskd_params(full, full.student_recipes[0], full.pairs[0])  # the cost curves' entries
    assert varied_only_in(params, "k") == ["tskd_k1", "tskd_k2", "tskd", "tskd_k4"]
    assert varied_only_in(params, "delta") == ["tskd_d2", "tskd", "tskd_d10"]


@pytest.mark.slow
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
            assert float(rows[name]["review_epoch_ratio"]) > 0 and float(rows[name]["run_ratio"]) > 0, rows[name]
        assert f"| {name} | {raw['methods'][name].get(VARIANT_KEY, name)} | " in md
    assert (out / "plots/study-accuracy.png").stat().st_size > 0
    assert (out / "plots/study-predictability.png").stat().st_size > 0
    assert rows["kd"]["run_ratio"] == "1.0" and Image.open(out / "plots/study-cost.png").size[0] > 300
    # Every TSKD run followed the fixed test images through its memory nodes, drawn as one grid per run.
    p = load_preset(repo / "params/ablations_smoke.yaml")
    for job in student_jobs(p):
        if p.registered(job.method) != "tskd":
            assert not (repo / student_dir(p, job) / EVOLUTION_FILE).exists()
            continue
        values = p.method_params(job.method, job.pair, job.recipe)
        memory = summarize_schedule(p.recipes[job.recipe].epochs, values["delta"], values["k"]).memory_epochs
        ev = read_evolution(repo / student_dir(p, job) / EVOLUTION_FILE)
        assert ev["epochs"].tolist() == sorted(e + 1 for slot in memory for e in slot), job
        grid = out / "plots/evolution" / f"{job.recipe}-{job.pair.name}-{job.method}-seed{job.seed}.png"
        assert Image.open(grid).size[1] > 300 and f"(plots/evolution/{grid.name})" in md
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
