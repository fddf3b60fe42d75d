"""The smoke DAG end to end with real Snakemake, in a temporary copy of the repo."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import build_once, copy_built, copy_repo
from tests.snakemake_runs import SNAKEMAKE, TRAINING, planned_jobs, snakemake

pytestmark = pytest.mark.slow

@pytest.fixture(scope="session")
def smoke_built(tmp_path_factory) -> Path:
    """The smoke DAG, run once per session (once across xdist's workers too)."""
    return build_once(tmp_path_factory, "smoke", lambda dest: snakemake(copy_repo(dest)))


@pytest.fixture
def smoke_repo(smoke_built, tmp_path) -> Path:
    """Each test's own copy of the finished smoke DAG: what one test reruns or edits, no other sees."""
    return copy_built(smoke_built, tmp_path / "repo")


def test_smoke_jobs_fork_from_the_warm_server(smoke_built):
    """Snakemake starts the warm server (workflow/rules/tracking.smk's onstart) and its training
    jobs fork from it; only those that start while it imports run cold."""
    logs = smoke_built / "results/smoke/logs"
    training = [*logs.glob("teachers/*.log"), *logs.glob("students/**/*.log")]
    warm = [f for f in training if "forked from the warm server" in f.read_text()]
    assert len(training) == 17 and len(warm) >= 12, sorted(map(str, set(training) - set(warm)))


def test_smoke_dag_produces_report_and_mlflow_runs(smoke_repo):
    from mlflow.tracking import MlflowClient

    from tskd.spec.config import load_preset
    from tskd.spec.grid import student_jobs

    p = load_preset(smoke_repo / "params/smoke.yaml")
    rows = list(csv.DictReader((smoke_repo / "results/smoke/report.csv").open()))
    expected = {(j.recipe, j.pair.name, j.method, str(j.seed)) for j in student_jobs(p)}
    got = {(r["recipe"], r["pair"], r["method"], r["seed"]) for r in rows if r["pair"] != "teacher"}
    assert got == expected
    for r in rows:
        assert 0.0 <= float(r["best_top1"]) <= 100.0
        if r["pair"] != "teacher":
            # The independent evaluation of the exported file reproduces the last epoch's figure.
            assert float(r["eval_top1"]) == pytest.approx(float(r["last_top1"]), abs=1e-6)
    md = (smoke_repo / "results/smoke/report.md").read_text()
    assert "best top-1" in md and "last top-1" in md and "±" in md

    client = MlflowClient(tracking_uri=f"sqlite:///{smoke_repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tskd-smoke")
    runs = client.search_runs([exp.experiment_id], TRAINING)
    assert len(runs) == len(p.teachers) + len(student_jobs(p))
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["method"] for r in runs} == {"vanilla"} | set(p.methods)
    assert {r.data.tags["recipe"] for r in runs} == {"teacher", "student"}
    assert all(r.info.run_name.startswith(f"seed{r.data.tags['seed']} ") for r in runs)
    for r in runs:  # TSKD's runs also keep their feature-map evolution, and the report logs its grid on them
        tskd = r.data.tags["method"] == "tskd"
        want = {"metrics.json", "model.pt"} | ({"evolution.npz", "plots"} if tskd else set())
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= want, r.info.run_name
        if tskd:
            grid = f"student-resnet20-resnet8-tskd-seed{r.data.tags['seed']}.png"
            assert [a.path for a in client.list_artifacts(r.info.run_id, "plots")] == [f"plots/{grid}"]
    # One parent per group of seeds, made once (onstart), holding its seeds' mean and std (the report).
    parents = client.search_runs([exp.experiment_id], "tags.run_kind = 'seeds'")
    assert len(parents) == len(p.teachers) + len(p.methods)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {r.info.run_id for r in parents}
    for parent in parents:
        children = [r for r in runs if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert parent.info.status == "FINISHED" and parent.data.metrics["n_seeds"] == len(children)
        assert parent.data.metrics["best_top1_mean"] == pytest.approx(
            sum(r.data.metrics["best_top1"] for r in children) / len(children))


def test_smoke_report_and_plots_show_every_method(smoke_repo):
    """report.md in the preset's order with its plots; `snakemake --report` and `dvc plots show`
    hold every plot and every method, TSKD included."""
    from tskd.reporting.plots import plot_files
    from tskd.spec.config import load_preset

    p = load_preset(smoke_repo / "params/smoke.yaml")
    md = (smoke_repo / "results/smoke/report.md").read_text()
    assert md.index("**Synthetic data**") < md.index("## Recipe")  # the banner first
    table = md.split("## Recipe `student`: best test top-1 (%)")[1].split("## ")[0]
    rows = [ln.split(" | ")[0].removeprefix("| ") for ln in table.splitlines() if ln.startswith("| ")][1:]
    assert rows[:2] == ["teacher network", "student network"]  # what each network is: params, MACs
    assert rows[2:] == ["teacher", "student alone", *(m for m in p.methods if m != "vanilla")]  # preset order
    rows = list(csv.DictReader((smoke_repo / "results/smoke/report.csv").open()))
    assert {int(r["best_epoch"]) for r in rows if r["pair"] != "teacher"} <= {1, 2, 3}  # as the logs: 1..3
    files = plot_files(p).values()
    for f in files:
        assert (smoke_repo / f).read_bytes()[:4] == b"\x89PNG" and f"({f.relative_to(p.out).as_posix()})" in md
    grids = [f for f in files if f.parent.name == "evolution"]  # TSKD's feature-map evolution, one per seed
    assert len(grids) == len(p.seeds) and all("-tskd-seed" in f.name for f in grids)
    tskd = json.loads((smoke_repo / "results/smoke/students/student/tskd/resnet20-resnet8/seed0/metrics.json")
                      .read_text())
    assert tskd["capture"]["epoch"] == 3 and len(tskd["capture"]["frames"]) == 2  # k=2, first review: epoch 3

    snakemake(smoke_repo, "--report", "report.html")
    html = (smoke_repo / "report.html").read_text()
    assert all(f.name in html for f in files)
    # Its results page is report.md rendered on one page; the report rule's command names the preset's
    # file (--json-file) instead of holding the preset on its command line.
    assert "results/smoke/report.html" in html and "--json-file" in html
    page = (smoke_repo / "results/smoke/report.html").read_text()
    shown = [f for f in files if f.parent.name != "evolution"]  # the evolution grids are linked, one per run
    assert "<table>" in page and page.count("data:image/png;base64,") == len(shown)

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        r = subprocess.run(["dvc", *args], cwd=smoke_repo, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0 and "WARNING" not in r.stdout + r.stderr, r.stderr  # DVC drops what it cannot read
        return r.stdout

    dvc("init", "--no-scm", "--force", "-q")  # the copy is no git repository
    shown = json.loads(dvc("plots", "show", "--json"))["data"]
    for method in p.methods:  # each method's vega curve holds every seed's every epoch, TSKD's included
        values = shown[f"test_top1-{method}"][0]["content"]["data"]["values"]
        assert sorted((v["filename"], v["epoch"]) for v in values) == [
            (f"seed{s}/metrics.json", e) for s in p.seeds for e in (1, 2, 3)], method
    assert all(shown[str(f)][0]["type"] == "image" for f in files)
    dvc("plots", "show", "-o", "dvc_plots")
    page = (smoke_repo / "dvc_plots/index.html").read_text()
    assert all(f"static/workspace_{str(f).replace('/', '_')}" in page for f in files)  # the PNGs, offline


def test_renaming_the_experiment_or_the_eval_batch_reruns_nothing(smoke_repo):
    params = smoke_repo / "params/smoke.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["tracking"] = {"experiment": "another-name"}
    raw["train"]["eval_batch_size"] = 31
    params.write_text(yaml.safe_dump(raw))
    assert "Nothing to be done" in snakemake(smoke_repo, "-n").stdout


def test_second_run_does_nothing(smoke_repo):
    r = snakemake(smoke_repo, "-n")
    assert "Nothing to be done" in r.stdout + r.stderr


def test_changing_a_kd_value_reruns_only_kd_jobs(smoke_repo):
    params = smoke_repo / "params/smoke.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["methods"]["kd"]["T"] = 2.0
    params.write_text(yaml.safe_dump(raw))
    vanilla = sorted((smoke_repo / "results/smoke/students/student/vanilla").rglob("metrics.json"))
    before = {f: f.stat().st_mtime_ns for f in vanilla}

    jobs = planned_jobs(smoke_repo)
    n_kd = len(raw["seeds"]) * len(raw["pairs"])
    assert jobs == {"student": n_kd, "evaluate": n_kd, "report": 1, "all": 1}, jobs

    snakemake(smoke_repo)
    assert {f: f.stat().st_mtime_ns for f in vanilla} == before
    assert "Nothing to be done" in snakemake(smoke_repo, "-n").stdout


def test_cifar100_dry_run_lists_every_job_without_data(tmp_path):
    """`snakemake -n` on the paper's grid needs no dataset: every job of the grid is listed."""
    from tskd.spec.config import load_preset
    from tskd.spec.grid import student_jobs

    repo = copy_repo(tmp_path)
    p = load_preset(repo / "params/cifar100.yaml")
    jobs = {}
    out = snakemake(repo, "-n", "--quiet", "rules", "--configfile", "params/cifar100.yaml").stdout
    for line in out.splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m:
            jobs[m.group(1)] = int(m.group(2))
    n = len(student_jobs(p))
    assert jobs == {"data": 1, "teacher": len(p.teachers), "student": n, "evaluate": n, "report": 1,
                    "all": 1, "total": 3 + len(p.teachers) + 2 * n}, jobs
    assert not (repo / "results").exists()


def test_a_published_teacher_file_is_an_input_of_its_rule(tmp_path):
    """Replaced with other weights (even keeping the old mtime, as cp -p or a checkout does), the
    file reruns the import; a missing file stops the DAG before anything runs."""
    import torch

    from tskd.models import create_model

    repo = copy_repo(tmp_path / "repo")
    published = tmp_path / "resnet20_vanilla" / "ckpt_epoch_240.pth"
    published.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet20").state_dict(), "epoch": 240}, published)
    params = repo / "params/smoke.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["teachers"]["resnet20"]["checkpoint"] = str(published)
    raw["dataset"]["synthetic"].update(train_per_class=2, test_per_class=2)
    params.write_text(yaml.safe_dump(raw))
    target = "results/smoke/teachers/resnet20/seed0/model.pt"

    snakemake(repo, target)
    assert "Nothing to be done" in snakemake(repo, "-n", target).stdout
    metrics = yaml.safe_load((repo / "results/smoke/teachers/resnet20/seed0/metrics.json").read_text())
    assert metrics["method"] == "imported" and metrics["source"] == str(published)

    before = published.stat()
    torch.manual_seed(1)
    torch.save({"model": create_model("resnet20").state_dict(), "epoch": 240}, published)
    os.utime(published, ns=(before.st_atime_ns, before.st_mtime_ns))
    out = snakemake(repo, "-n", "--quiet", "rules", "--", target).stdout
    assert re.search(r"^\s*teacher\s+1\s*$", out, re.M), out

    published.unlink()
    r = snakemake(repo, target, check=False)
    assert r.returncode != 0
    assert f"teachers.resnet20.checkpoint: {published} is not a file" in r.stdout + r.stderr
    assert "rule teacher" not in r.stdout + r.stderr  # refused while the DAG was built, no job started


def _rest(url: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _browser_dom(url: str) -> str:
    """The page as Debian's chromium shows it once its JavaScript has run (`make browser` installs it)."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:  # the REST checks above it ran; `make test` installs it as root
        pytest.skip("the UI half needs chromium on PATH (`make browser` installs it as root)")
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--virtual-time-budget=20000", "--dump-dom", url], capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_mlflow_server_finds_every_run_by_its_tags_and_the_ui_lists_them(smoke_repo, tmp_path):
    """`mlflow server` on the smoke store: every training run is found through the REST API by its
    tags, with every param of its identity; in a real browser, the experiment page lists the groups
    and a run's page its name."""
    from tests.mlflow_server import mlflow_server
    from tskd.spec.config import load_preset
    from tskd.tracking.runs import grid_specs, pair_label, parent_name, run_name
    from tskd.tracking.store import flatten

    p = load_preset(smoke_repo / "params/smoke.yaml")
    p = p.model_copy(update={"results_dir": str(smoke_repo / "results")})
    with mlflow_server(f"sqlite:///{smoke_repo / 'mlflow.db'}", tmp_path / "artifacts") as url:
        exp = _rest(url, "experiments/get-by-name?experiment_name=tskd-smoke")["experiment"]["experiment_id"]
        found = {}
        for spec in grid_specs(p):
            tags = {"run_kind": "train", "preset": "smoke", "role": spec.role, "method": spec.method,
                    "pair": pair_label(spec), "recipe": spec.recipe_name, "seed": str(spec.seed)}
            query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
            runs = _rest(url, "runs/search", {"experiment_ids": [exp], "filter": query})["runs"]
            assert len(runs) == 1, (query, runs)
            run = runs[0]
            assert run["info"]["run_name"] == run_name(spec)
            params = {x["key"]: x["value"] for x in run["data"]["params"]}
            assert flatten(spec.identity()).items() <= params.items()  # the whole identity, as logged
            assert {"data_identity", "teacher_sha256", "device"} <= set(params)
            found[run["info"]["run_id"]] = spec
        dom = _browser_dom(f"{url}/#/experiments/{exp}/runs")
        for spec in found.values():  # the parents; their seeds are nested under them
            assert parent_name(spec) in dom, parent_name(spec)
        run_id, spec = next(iter(found.items()))
        assert run_name(spec) in _browser_dom(f"{url}/#/experiments/{exp}/runs/{run_id}")


def test_params_errors_at_dag_build_name_the_file_and_the_key(tmp_path):
    """Snakemake builds the DAG with tskd's validator alone: strict types and a key given twice are refused
    there as `tskd check` refuses them, naming the file and the key (no JSON-schema dump naming no file)."""
    repo = copy_repo(tmp_path)
    text = (repo / "params/smoke.yaml").read_text()
    (repo / "params/typed.yaml").write_text(text.replace("batch_size: 64", 'batch_size: "64"', 1))
    (repo / "params/twice.yaml").write_text(text + "seeds: [5]\n")

    r = snakemake(repo, "-n", "--configfile", "params/typed.yaml", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "params/typed.yaml" in out and "recipes.teacher.batch_size" in out, out[-3000:]
    assert "ValidationError" not in out and "Traceback" not in out, out[-3000:]

    r = snakemake(repo, "-n", "--configfile", "params/twice.yaml", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "params/twice.yaml" in out and "'seeds' given twice" in out, out[-3000:]


def test_a_failed_job_says_why_the_teacher_goes_first_and_the_others_keep_going(tmp_path):
    """One core, a teacher that fails within seconds (a broken published file) and a student alone that needs
    no teacher. The teacher's priority starts it first; the default profile (profiles/default) keeps going
    after its failure, and the terminal shows the job's one-line reason and its log, not only the command."""
    repo = copy_repo(tmp_path)
    raw = yaml.safe_load((repo / "params/smoke.yaml").read_text())
    raw.update(preset="fail", methods={"vanilla": {}, "kd": {}}, seeds=[0])
    raw["dataset"]["synthetic"].update(train_per_class=2, test_per_class=2)
    raw["recipes"]["student"].update(epochs=1, milestones=[])
    raw["teachers"]["resnet20"]["checkpoint"] = "broken.pth"
    (repo / "params/fail.yaml").write_text(yaml.safe_dump(raw))
    (repo / "broken.pth").write_text("not a checkpoint\n")

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    r = subprocess.run([*SNAKEMAKE, "--cores", "1", "--configfile", "params/fail.yaml"], cwd=repo,
                       capture_output=True, text=True, env=env, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    log = "results/fail/logs/teachers/resnet20-seed0.log"
    assert re.search(rf"^tskd import-teacher: error: cannot read checkpoint broken.pth.*\(log: {log}\)$", out,
                     re.M), out[-3000:]
    # The job's command names the preset file and its run directory, not kilobytes of spec JSON.
    assert '"method_params"' not in out and "--job results/fail/teachers/resnet20/seed0" in out, out[-3000:]
    # Snakemake's job blocks, in the order the jobs started (no `message:`: the blocks list each job's
    # input and output, which a dry run shows too).
    started = re.findall(r"^(?:local)?rule (\w+):$", out, re.M)
    assert started[:3] == ["data", "teacher", "student"], started
    # keep-going: the student alone trained and was evaluated after the teacher had failed.
    run = repo / "results/fail/students/student/vanilla/resnet8/seed0"
    assert (run / "metrics.json").is_file() and (run / "eval.json").is_file()
    assert not (repo / "results/fail/teachers/resnet20/seed0/model.pt").exists()

    # tskd status reads the same files: which job failed and why, which is done, which waits.
    status = subprocess.run([sys.executable, "-m", "tskd.cli", "status", "params/fail.yaml"], cwd=repo,
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "3 training jobs: 1 done, 0 running, 0 stopped, 1 failed, 1 waiting", status.stdout
    assert re.search(r"^  teacher resnet20 seed0 +failed ", status.stdout, re.M), status.stdout
    assert re.search(r"^  vanilla resnet8 student seed0 +done .* 1/1$", status.stdout, re.M), status.stdout
    assert re.search(r"^  kd resnet20-resnet8 student seed0 +waiting ", status.stdout, re.M), status.stdout
    assert "failed: teacher resnet20 seed0: tskd import-teacher: error: cannot read checkpoint broken.pth" in \
        status.stdout, status.stdout
    # The DAG failed before its report: no run or parent in the store claims to be running.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
