"""`tskd dvc sync` re-hashes the outputs of its own pipeline only: every generated pipeline has stages
named `data` and `report`, so a damaged output of another pipeline's `data` must not block this one.

Two pipelines in a copy of the repo (smoke: dvc.yaml, ablations_smoke: pipelines/ablations_smoke/),
each with its `data` stage's output made by hand and committed to DVC; nothing is trained. The cache
file of ablations_smoke's output is then damaged and checked out, which DVC reports as current.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_repo, run_cli
from tskd.workflow.dvc_pipeline import load_raw, pipeline_path, render

BIN = str(Path(sys.executable).parent)  # dvc and snakemake of this environment
SMOKE, ABL = "params/smoke.yaml", "params/ablations_smoke.yaml"
ABL_PIPELINE = "pipelines/ablations_smoke/dvc.yaml"


def _dvc(repo: Path, *args: str) -> None:
    r = subprocess.run([f"{BIN}/dvc", *args], cwd=repo, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"dvc {' '.join(args)}:\n{r.stdout[-2000:]}{r.stderr[-2000:]}"


def _marker(preset: str) -> bytes:
    return f'{{"preset": "{preset}"}}\n'.encode()  # differs per preset: two cache files, one damaged


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("two_pipelines"))
    for leftover in ("dvc.lock", "mlflow.db"):
        (repo / leftover).unlink(missing_ok=True)
    p, raw = load_raw(repo / ABL)
    path = pipeline_path(p)
    assert path.as_posix() == ABL_PIPELINE
    (repo / path).parent.mkdir(parents=True)
    (repo / path).write_text(render(p, raw, ABL, path))
    _dvc(repo, "config", "core.no_scm", "true")
    for preset in ("smoke", "ablations_smoke"):
        marker = repo / "results" / preset / "data/dataset.json"
        marker.parent.mkdir(parents=True)
        marker.write_bytes(_marker(preset))
    # dvc.lock of each pipeline records its `data` stage (its params and the hand-made output).
    _dvc(repo, "commit", "-f", "dvc.yaml:data", f"{ABL_PIPELINE}:data")
    md5 = hashlib.md5(_marker("ablations_smoke")).hexdigest()
    obj = repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    obj.chmod(0o644)
    obj.write_bytes(_marker("ablations_smokE"))  # the same size: only a hash tells
    obj.chmod(0o444)
    (repo / "results/ablations_smoke/data/dataset.json").unlink()
    _dvc(repo, "checkout", "--force", f"{ABL_PIPELINE}:data")
    return repo


def test_verify_picks_stages_by_pipeline_and_name(repo):
    from tskd.workflow.dvc_verify import verify

    assert verify(repo, only={("dvc.yaml", "data"), ("dvc.yaml", "report")}) == []
    problems = verify(repo, only={(ABL_PIPELINE, "data")})
    assert {pr.kind for pr in problems} == {"corrupt cache", "output differs from the lock"}
    assert all(pr.owner.startswith("pipelines/ablations_smoke/dvc.lock:data") for pr in problems)
    assert verify(repo, only={("pipelines/other/dvc.yaml", "data")}) == []


@pytest.mark.slow  # one `snakemake --touch`
def test_another_pipelines_damaged_output_does_not_block_the_sync(repo):
    env = {"PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    r = run_cli("dvc", "sync", SMOKE, cwd=repo, env=env)
    assert r.returncode == 0, r.stderr
    assert "records 1 stages that dvc.lock shows current: data" in r.stdout
    # Its own damaged output still stops the pipeline's sync, and the fix names the stage as DVC does.
    r = run_cli("dvc", "sync", ABL, cwd=repo, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "output differs from the lock: results/ablations_smoke/data/dataset.json" in r.stderr
    assert "(recorded by pipelines/ablations_smoke/dvc.lock:data)" in r.stderr
    assert f"`dvc repro -f -s <stage>`: {ABL_PIPELINE}:data" in r.stderr
