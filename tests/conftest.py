"""Shared fixtures: a tiny synthetic CIFAR-100 written in the real format, run specs, MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The SLURM fixtures' module is imported by name in test modules and also loaded as their plugin;
# registering it first lets pytest rewrite its asserts either way (otherwise: a warning per run).
pytest.register_assert_rewrite("tests.slurm_fixtures")

REPO = Path(__file__).resolve().parents[1]


def needs_program(*names: str, installed_by: str) -> pytest.MarkDecorator:
    """Skip, naming what is missing, where none of ``names`` is on PATH. `make test` installs them
    where it may (root); a user without root still runs the rest of the suite."""
    return pytest.mark.skipif(not any(shutil.which(n) for n in names),
                              reason=f"needs {' or '.join(names)} on PATH ({installed_by} installs it as root)")


needs_cxx = needs_program("g++", "c++", "clang++", installed_by="make cxx")
needs_chromium = needs_program("chromium", "chromium-browser", installed_by="make browser")


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module of tiny-batch steps: they gain nothing from more,
    and on a shared two-core machine OpenMP threads that spin-wait make them up to ten times slower."""
    import torch  # here, not at the top: most test modules never need torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> Path:
    """A 100-class synthetic CIFAR-100 (3 train / 2 test images per class), read by torchvision."""
    from tskd.data.synthetic import write_synthetic_cifar100

    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar100(root, seed=0, train_per_class=3, test_per_class=2)
    return root


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def make_spec(tiny_cifar, tmp_path):
    """Build a RunSpec for a tiny run; keyword overrides go to the spec or its recipe."""
    from tskd.spec.config import Cifar100Data, RecipeCfg, TrainCfg
    from tskd.spec.grid import RunSpec

    def make(out: str = "run", recipe: dict | None = None, **kw) -> RunSpec:
        r = {"epochs": 2, "batch_size": 50, "lr": 0.05, "milestones": [1]} | (recipe or {})
        fields = dict(preset="test", role="student", method="vanilla", arch="resnet8", seed=0,
                      dataset=Cifar100Data(root=str(tiny_cifar)), recipe=RecipeCfg(**r),
                      train=TrainCfg(device="cpu", threads=1), out_dir=str(tmp_path / out),
                      experiment="tskd-test")
        return RunSpec(**(fields | kw))

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m tskd.cli ARGS` in a fresh process (as Snakemake does)."""
    return subprocess.run([sys.executable, "-m", "tskd.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def copy_repo(dest: Path) -> Path:
    """The tracked (and untracked, not ignored) files of the repo, copied to ``dest``."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def build_once(tmp_path_factory, name: str, make) -> Path:
    """``make(dest)`` run once per test session, even across pytest-xdist's workers: the first
    worker to ask builds under a file lock in the session's shared temporary root, the others wait
    and get the same directory. Treat it as read-only; copy it (``copy_built``) to change it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # popen-gw0, popen-gw1, ... share their parent
    dest = root / f"built-{name}"
    with FileLock(f"{dest}.lock"):
        if not (dest / ".built").exists():  # a failed build is retried, not trusted
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            make(dest)
            (dest / ".built").touch()
    return dest


def copy_built(src: Path, dest: Path) -> Path:
    """A private copy of a built repo: mtimes kept (Snakemake's and DVC's view of what is up to date
    stays), and its SQLite MLflow store pointed at the copy's own artifacts, so a test that trains,
    logs or deletes there leaves the shared original as it found it."""
    import sqlite3

    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(".built"))
    db = dest / "mlflow.db"
    if db.exists():
        old, new = src.resolve().as_uri(), dest.resolve().as_uri()
        with sqlite3.connect(db) as con:
            con.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
            con.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
        con.close()
    return dest


# Tests on the local SLURM cluster or a live MLflow server are slow by what they start (daemons,
# a database, a server process), whatever they then check: `make test-fast` leaves them out.
SLOW_FIXTURES = {"slurm_cluster", "auth_server", "logged_run"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
