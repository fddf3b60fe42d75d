"""DVC end to end: `dvc repro` of a small grid in a git copy of the repo, reruns counted, agreement
with Snakemake, run-cache and MLflow, a local remote round trip, mtimes after a pull, bad input.

The grid is the smoke preset cut to vanilla and kd, one seed, 2 epochs on 3 images per class,
so that every DVC stage (each a Snakemake call) is exercised within the test budget.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_once, copy_built, copy_repo

pytestmark = pytest.mark.slow

BIN = str(Path(sys.executable).parent)  # dvc, snakemake and tskd of this environment
KD = "train-student-kd-resnet20-resnet8-seed0"
KD_EVAL = "eval-student-kd-resnet20-resnet8-seed0"


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}


def sh(repo: Path, *cmd: str, check: bool = True, timeout: float = 900,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=repo, capture_output=True, text=True, env=_env(repo) | (env or {}),
                       timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def ran(out: str) -> set[str]:
    """The stages `dvc repro` ran (not skipped, not restored)."""
    return set(re.findall(r"Running stage '([^']+)'", out))


def snakemake_plan(repo: Path, env: dict[str, str] | None = None) -> dict[str, int]:
    out = sh(repo, "snakemake", "-n", "--cores", "1", "--quiet", "rules", env=env).stdout
    plan = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m.group(1) not in ("total", "all"):  # `all` is the target rule, no job
            plan[m.group(1)] = int(m.group(2))
    return plan


def mlflow_runs(repo: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tskd-smoke")
    # Training runs only: the parents that group their seeds are made once, by the DAG's onstart.
    return len(client.search_runs([exp.experiment_id], "tags.run_kind = 'train'")) if exp else 0


def set_param(repo: Path, edit) -> None:
    path = repo / "params/smoke.yaml"
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def md5s(repo: Path, root: str = "results") -> dict[str, str]:
    return {str(f.relative_to(repo)): hashlib.md5(f.read_bytes()).hexdigest()
            for f in sorted((repo / root).rglob("*"))
            # Not DVC outputs: logs, and a run's MLflow id, tracking journal and writer's lock.
            if f.is_file() and not {"logs", "tracking"} & set(f.parts) and f.name not in ("mlflow_run.json", ".lock")}


def lock_out(repo: Path, stage: str, name: str) -> dict:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return next(o for o in lock[stage]["outs"] if o["path"].endswith("/" + name))


def _small_grid(raw: dict) -> None:
    raw["methods"] = {"vanilla": {}, "kd": {"T": raw["methods"]["kd"]["T"]}}  # kd's weights: the code's defaults
    raw["seeds"] = [0]
    for r in raw["recipes"].values():
        r.update(epochs=2, milestones=[1])
    raw["dataset"]["synthetic"].update(train_per_class=3, test_per_class=3)


def _build(repo: Path) -> None:
    copy_repo(repo)
    for leftover in ("dvc.lock", "mlflow.db"):
        (repo / leftover).unlink(missing_ok=True)
    set_param(repo, _small_grid)
    sh(repo, "tskd", "dvc", "write", "params/smoke.yaml")
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", "--allow-empty")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "grid")
    r = sh(repo, "dvc", "repro")
    repo.joinpath("first_repro.log").write_text(r.stdout)


@pytest.fixture(scope="session")
def dvc_built(tmp_path_factory) -> Path:
    """The small grid after its first `dvc repro`, built once per session."""
    return build_once(tmp_path_factory, "dvc-grid", _build)


@pytest.fixture
def repo(dvc_built, tmp_path) -> Path:
    """Each test's own copy (git, DVC cache, results, MLflow store): no test sees another's edits."""
    return copy_built(dvc_built, tmp_path / "repo")


def commit(repo: Path, msg: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", msg)


def test_repro_runs_every_stage_caches_outputs_and_reports(repo):
    stages = set(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    assert ran((repo / "first_repro.log").read_text()) == stages
    assert mlflow_runs(repo) == 3  # teacher, vanilla, kd: every training stage recorded a run
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    model = lock_out(repo, KD, "model.pt")
    assert model["path"] == "results/smoke/students/student/kd/resnet20-resnet8/seed0/model.pt"
    obj = repo / ".dvc/cache/files/md5" / model["md5"][:2] / model["md5"][2:]
    assert obj.read_bytes() == (repo / model["path"]).read_bytes()  # the model is in DVC's cache
    assert lock[KD]["params"]["params/smoke.yaml"]["methods.kd"]["T"] == 4.0

    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    metrics = next(iter(shown.values()))["data"]
    kd = metrics["results/smoke/summary/kd.json"]["data"]["student"]["resnet20-resnet8"]
    with (repo / "results/smoke/report.csv").open() as f:
        kd_row = next(r for r in csv.DictReader(f) if r["method"] == "kd")
    assert kd["best"] == pytest.approx(float(kd_row["best_top1"]), abs=1e-3) and kd["n"] == 1
    assert set(metrics) == {f"results/smoke/summary/{n}.json" for n in ("teachers", "vanilla", "kd")}
    table = sh(repo, "dvc", "metrics", "show").stdout
    assert "results/smoke/summary/kd.json" in table and "student.resnet20-resnet8.best" in table

    sh(repo, "dvc", "plots", "show", "-o", "plots")
    html = (repo / "plots/index.html").read_text()
    assert "test_top1-kd" in html and '"epoch"' in html and "test_top1" in html


def test_nothing_changed_nothing_runs_in_dvc_or_snakemake(repo):
    r = sh(repo, "dvc", "repro")
    assert ran(r.stdout) == set() and "up to date" in r.stdout
    assert snakemake_plan(repo) == {}
    # The pipeline; data.dvc records the empty data/ of a fresh clone, not in this copy's cache.
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status", "dvc.yaml").stdout


def test_changing_one_method_reruns_only_its_jobs_in_both(repo):
    before = md5s(repo)
    runs = mlflow_runs(repo)
    set_param(repo, lambda raw: raw["methods"]["kd"].update(T=2.0))
    # Snakemake (its metadata was written by the jobs DVC ran) and DVC agree on what is stale.
    assert snakemake_plan(repo) == {"student": 1, "evaluate": 1, "report": 1}
    status = sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout
    assert set(json.loads(status)) == {"params-check", KD, KD_EVAL, "report"}
    r = sh(repo, "dvc", "repro")
    assert ran(r.stdout) == {"params-check", KD, KD_EVAL, "report"}
    assert mlflow_runs(repo) == runs + 1
    after = md5s(repo)
    changed = {f for f in after if after[f] != before.get(f)}
    assert changed and all("/kd/" in f or "summary" in f or "report" in f or "/plots/" in f for f in changed)
    assert {f for f in changed if "/plots/" in f} == {  # the plots that show kd; the others stay as they were
        "results/smoke/plots/student-kd-losses.png", "results/smoke/plots/student-resnet20-resnet8-test_top1.png"}
    assert snakemake_plan(repo) == {}
    commit(repo, "kd T=2")

    # An experiment edits the same file and reruns the same stages.
    r = sh(repo, "dvc", "exp", "run", "-S", "params/smoke.yaml:methods.kd.T=3")
    assert ran(r.stdout) == {"params-check", KD, KD_EVAL, "report"}
    assert sh(repo, "dvc", "exp", "list", "--name-only").stdout.strip()  # the experiment is recorded
    # Back to the committed version: DVC restores the T=2 files, but Snakemake's records still
    # describe the T=3 run, until `tskd dvc sync` re-records what dvc.lock vouches for.
    sh(repo, "git", "checkout", "params/smoke.yaml", "dvc.lock")
    sh(repo, "dvc", "checkout")
    assert snakemake_plan(repo) == {"student": 1, "evaluate": 1, "report": 1}
    assert "7 stages" in sh(repo, "tskd", "dvc", "sync", "params/smoke.yaml").stdout
    assert snakemake_plan(repo) == {}
    assert ran(sh(repo, "dvc", "repro").stdout) == set()


def test_renaming_the_experiment_reruns_nothing(repo):
    """The MLflow experiment and the evaluation batch size change no result: neither executor reruns."""
    set_param(repo, lambda raw: raw.update(tracking={"experiment": "renamed"},
                                           train=dict(raw["train"], eval_batch_size=17)))
    assert snakemake_plan(repo) == {}
    assert set(json.loads(sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout)) == {"params-check"}
    sh(repo, "git", "checkout", "params/smoke.yaml")


def test_a_changed_default_in_the_code_reruns_that_methods_jobs_in_both(repo):
    """A new tskd version with another default for a value the preset leaves out (kd_weight):
    Snakemake plans exactly the kd jobs, DVC stops until the defaults file is regenerated and then
    names exactly the kd stages. Runs with this copy's code (PYTHONPATH), then restores it."""
    code = repo / "tskd/distill/methods/kd.py"
    original = code.read_text()
    assert 'kd_weight: float = Field(1.0,' in original
    env = {"PYTHONPATH": str(repo)}
    try:
        code.write_text(original.replace('kd_weight: float = Field(1.0,', 'kd_weight: float = Field(0.5,'))
        assert snakemake_plan(repo, env) == {"student": 1, "evaluate": 1, "report": 1}
        r = sh(repo, "tskd", "dvc", "check", "params/smoke.yaml", check=False, env=env)
        assert r.returncode == 2 and "workflow/defaults.yaml no longer holds the code's defaults" in r.stderr
        sh(repo, "tskd", "dvc", "write", "params/smoke.yaml", env=env)
        assert set(json.loads(sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout)) == {KD, KD_EVAL}
    finally:
        code.write_text(original)
        sh(repo, "tskd", "dvc", "write", "params/smoke.yaml")
    assert snakemake_plan(repo) == {} and json.loads(sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout) == {}


def test_training_stages_never_come_from_the_run_cache(repo):
    """Removing a model makes DVC retrain (and record an MLflow run), not restore it silently.

    On CPU the rerun reproduces the model bit for bit, so its evaluation is then up to date."""
    runs = mlflow_runs(repo)
    kd_dir = repo / "results/smoke/students/student/kd/resnet20-resnet8/seed0"
    model = (kd_dir / "model.pt").read_bytes()
    (kd_dir / "model.pt").unlink()
    (kd_dir / "metrics.json").unlink()
    r = sh(repo, "dvc", "repro")
    assert KD in ran(r.stdout) and "is cached - skipping run" not in r.stdout
    assert KD_EVAL not in ran(r.stdout)
    assert mlflow_runs(repo) == runs + 1
    assert (kd_dir / "model.pt").read_bytes() == model


def test_snakemake_made_results_are_committed_to_dvc(repo):
    set_param(repo, lambda raw: raw["methods"]["kd"].update(T=3.0))  # the grid was built with T=4
    sh(repo, "snakemake", "--cores", "2")
    assert set(json.loads(sh(repo, "dvc", "status", "--json").stdout)) >= {KD, KD_EVAL, "report"}
    sh(repo, "dvc", "commit", "-f", "dvc.yaml")  # the pipeline's stages (data.dvc's data/ is not in this copy)
    assert ran(sh(repo, "dvc", "repro").stdout) == set()


def test_stale_dvc_yaml_stops_the_pipeline(repo):
    report = (repo / "results/smoke/report.csv").read_bytes()
    # An override adds a key the kd stage does not declare: only the params check sees it.
    set_param(repo, lambda raw: raw["pairs"][0].update(methods={"kd": {"T": 1.0}}))
    r = sh(repo, "dvc", "repro", check=False)
    assert r.returncode != 0
    assert "dvc.yaml is out of date with params/smoke.yaml" in r.stdout + r.stderr
    assert "tskd dvc write params/smoke.yaml" in r.stdout + r.stderr
    assert KD not in ran(r.stdout)
    # Snakemake, as a DVC stage, refuses too (a user may run `dvc repro <stage>` alone).
    r = sh(repo, "dvc", "repro", "--single-item", "--force", KD, check=False)
    assert r.returncode != 0 and "out of date" in r.stdout + r.stderr
    assert (repo / "results/smoke/report.csv").read_bytes() == report
    sh(repo, "git", "checkout", "params/smoke.yaml")
    assert ran(sh(repo, "dvc", "repro").stdout) <= {"params-check"}


def test_remote_round_trip_and_mtimes_after_pull(repo, tmp_path):
    from tskd.data.synthetic import write_synthetic_cifar100

    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "store", str(remote))
    # A dataset put into data/ and versioned, as the README describes for real ones.
    write_synthetic_cifar100(repo / "data/cifar100", seed=1, train_per_class=2, test_per_class=1)
    sh(repo, "dvc", "add", "data")
    commit(repo, "remote and data")
    sh(repo, "dvc", "push")
    want = md5s(repo) | md5s(repo, "data")

    clone = tmp_path / "clone"
    sh(repo, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "results").exists()
    sh(clone, "dvc", "pull")
    assert md5s(clone) | md5s(clone, "data") == want
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "status").stdout
    assert ran(sh(clone, "dvc", "repro").stdout) == set()

    # Checkout order decides mtimes; force the worst case: the teacher newer than every student.
    teacher = clone / "results/smoke/teachers/resnet20/seed0/model.pt"
    future = teacher.stat().st_mtime + 100
    os.utime(teacher, (future, future))
    r = sh(clone, "snakemake", "-n", "--cores", "1")
    assert "Nothing to be done" in r.stdout + r.stderr
    assert "made newer than their inputs" in r.stderr and KD in r.stderr
    # Snakemake has no records of files it did not make, so a params edit would go unseen;
    # `tskd dvc sync` records them (after which the edit reruns exactly its jobs).
    set_param(clone, lambda raw: raw["methods"]["kd"].update(T=5.0))
    assert snakemake_plan(clone) == {}
    sh(clone, "git", "checkout", "params/smoke.yaml")
    sh(clone, "tskd", "dvc", "sync", "params/smoke.yaml")
    set_param(clone, lambda raw: raw["methods"]["kd"].update(T=5.0))
    assert snakemake_plan(clone) == {"student": 1, "evaluate": 1, "report": 1}
    sh(clone, "git", "checkout", "params/smoke.yaml")
    # Only what dvc.lock vouches for: a teacher that really changed still retrains its students.
    teacher.write_bytes(teacher.read_bytes() + b"\0")
    os.utime(teacher, (future + 100, future + 100))
    assert snakemake_plan(clone).get("student") == 1  # kd; vanilla has no teacher


def test_missing_remote_and_corrupt_cache_fail_clearly(repo, tmp_path):
    sh(repo, "dvc", "remote", "add", "-d", "store", str(tmp_path / "remote"))
    commit(repo, "remote")
    clone = tmp_path / "clone"
    sh(repo, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "dvc", "remote", "remove", "store")
    r = sh(clone, "dvc", "pull", check=False)
    assert r.returncode != 0 and "no remote" in (r.stdout + r.stderr).lower()
    sh(clone, "dvc", "remote", "add", "-d", "store", str(tmp_path / "nowhere"))
    r = sh(clone, "dvc", "pull", check=False)
    assert r.returncode != 0 and "missing" in (r.stdout + r.stderr).lower()
    assert not [f for f in (clone / "results").rglob("*") if f.is_file()]  # directories at most

    # Damage one cached model as a disk or a bad copy would (DVC itself trusts the file).
    model = lock_out(repo, KD, "model.pt")
    md5 = model["md5"]
    obj = repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    obj.chmod(0o444)
    r = sh(repo, "tskd", "dvc", "verify", check=False)
    assert r.returncode == 2
    assert f"corrupt cache: .dvc/cache/files/md5/{md5[:2]}/{md5[2:]}" in r.stderr and KD in r.stderr
    # DVC checks it out and then reports the damaged file as current ...
    (repo / model["path"]).unlink()
    sh(repo, "dvc", "checkout", "--force")
    assert json.loads(sh(repo, "dvc", "status", "--json", "dvc.yaml").stdout) == {}
    # ... `tskd dvc sync`, the step after a pull or checkout, re-hashes and vouches for nothing.
    r = sh(repo, "tskd", "dvc", "sync", "params/smoke.yaml", check=False)
    assert r.returncode == 2
    assert f"output differs from the lock: {model['path']}" in r.stderr and f"-s <stage>`: {KD}" in r.stderr
    sh(repo, "tskd", "dvc", "verify", "--remove-corrupt", check=False)
    assert not obj.exists()
    assert KD in ran(sh(repo, "dvc", "repro", "-f", "-s", KD).stdout)
    assert sh(repo, "tskd", "dvc", "verify").returncode == 0
