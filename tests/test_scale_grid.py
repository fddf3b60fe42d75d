"""The cifar100 grid's rehearsal, reduced (two pairs, every method, one recipe, one seed), under
`snakemake --profile slurm` on the test cluster, logging to slurm/mlflow-server.sh on MariaDB: the same
script (benchmarks/bench_scale.py) that measures the whole grid, run here for its checks. Afterwards
DVC records the grid Snakemake made (`dvc commit`, a clean `dvc status`, `dvc push`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.slurm_fixtures"]  # the slurm_cluster fixture
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rehearsal(slurm_cluster, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("scale")
    out = work / "figures.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_scale.py"), "--preset",
                        str(REPO / "params/cifar100.yaml"), "--pairs", "2", "--recipes", "1", "--seeds", "1",
                        "--jobs", "8", "--workdir", str(work), "--json", str(out),
                        "--db-name", "tskd_mlflow_scale_test"], capture_output=True, text=True, timeout=1800)
    assert out.is_file(), r.stdout[-4000:] + r.stderr[-4000:]
    figures = json.loads(out.read_text())
    print(json.dumps(figures, indent=1), file=sys.stderr)
    return figures | {"rc": r.returncode, "output": r.stdout[-4000:] + r.stderr[-4000:], "work": work}


def test_the_reduced_grid_runs_every_job_on_slurm(rehearsal):
    f = rehearsal
    assert f["jobs"] == {"all": 1, "data": 1, "teacher": 2, "student": 16, "evaluate": 16, "report": 1}
    assert f["snakemake_rc"] == 0, f["output"]
    assert f["snakemake -n nothing to do"], "Snakemake has work left on the finished grid"
    # every training job wrote its phases: queue, python, imports, data, models, run start, teardown
    assert f["jobs_with_phases"] == f["training_jobs"] == 18
    assert set(f["phases_s"]) >= {"queue", "imports", "run start", "teardown", "overhead"}
    assert f["tskd status"].startswith("18 training jobs: 18 done"), f["tskd status"]


def test_a_waiting_launcher_stays_light(rehearsal):
    # `tskd train --launch` only submits and waits: it never imports torch (~500 MB a process), so a
    # login node can hold hundreds in flight (tskd.workflow.job_spec.spec_of_job_light)
    peak = rehearsal["login_side_at_peak"]
    assert peak and peak["launchers"] >= 2, rehearsal["output"]
    assert peak["launcher_rss_mb_each"] < 150, peak


def test_the_tracking_server_has_every_run_and_nothing_left_running(rehearsal):
    store = rehearsal["store"]
    assert store["train_runs"] == store["expected_train_runs"] == 18, store
    assert set(store["statuses"]) == {"FINISHED"}, store
    assert store["parents"] == 18 and not store["childless_parents"], store  # one seed: a parent per run
    assert rehearsal["probe_errors"] == 0


def test_dvc_records_what_snakemake_made_and_pushes_it(rehearsal):
    assert rehearsal["dvc status clean"] and rehearsal["dvc push ok"], rehearsal["output"]
    remote = Path(rehearsal["work"]) / "remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) >= 18 * 2  # every model.pt and metrics.json


def test_the_mlflow_ui_shows_the_runs_table(rehearsal):
    if "ui skipped" in rehearsal:  # make test installs both; a bare `pytest` may lack them
        pytest.skip(rehearsal["ui skipped"])
    assert "ui error" not in rehearsal, rehearsal["ui error"]
    assert rehearsal["ui runs table s"] > 0 and rehearsal["ui run page s"] > 0
    assert rehearsal["ok"], rehearsal["output"]


def test_a_finished_grid_is_measured_again_without_running(rehearsal, tmp_path):
    # --again: the store and the commands on the grid the rehearsal finished, nothing trained; the
    # run's own figures (wall time, memory) stay in the JSON beside the new ones.
    out = tmp_path / "again.json"
    out.write_text(json.dumps({k: v for k, v in rehearsal.items() if k not in ("work", "output", "rc")}))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_scale.py"), "--again", "--workdir",
                        str(rehearsal["work"]), "--json", str(out), "--no-ui", "--db-name", "tskd_mlflow_scale_test"],
                       capture_output=True, text=True, timeout=900)
    f = json.loads(out.read_text())
    assert r.returncode == 0 and f["ok"], r.stdout[-3000:] + r.stderr[-3000:]
    assert f["wall_s"] == rehearsal["wall_s"] and "measured again" in f
    assert f["snakemake -n nothing to do"] and f["store"]["train_runs"] == 18
    assert f["tskd status"].startswith("18 training jobs: 18 done")


def test_again_names_a_workdir_that_holds_no_finished_grid(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks/bench_scale.py"), "--again", "--workdir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"{tmp_path}/repo/params/cifar100_scale.yaml: missing" in r.stderr and "Traceback" not in r.stderr
