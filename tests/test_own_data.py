"""Your own data, as docs/data.md ("Your own data") tells it: examples/own_data/ end to end, the
message that asks to register unregistered data, and `tskd check`'s warning for a missing root."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_repo, run_cli

EXAMPLE = REPO / "examples" / "own_data"
TERMINAL = 100  # the widest line a message may have, its "tskd <verb>: error: " prefix included
PREFIX = "tskd import-teacher: error: "  # the longest verb that reads a dataset


def _example():
    spec = importlib.util.spec_from_file_location("own_data_write_dataset", EXAMPLE / "write_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unregistered_error(root: Path) -> str:
    from tskd.data.cifar import verify_cifar100_dir
    from tskd.data.integrity import IntegrityError

    _example().write_dataset(root, train_per_class=2, test_per_class=1)
    with pytest.raises(IntegrityError) as e:
        verify_cifar100_dir(root / "cifar-100-python")
    return str(e.value)


# -- the example's data ----------------------------------------------------------------------------
def test_the_example_writes_what_the_reader_reads_and_the_same_bytes_for_a_seed(tmp_path):
    import pickle

    from tskd.data.cifar import register_cifar100_layout

    ex = _example()
    a, b = (ex.write_dataset(tmp_path / name, seed=3, train_per_class=4, test_per_class=2) for name in "ab")
    for f in ("train", "test", "meta"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    train = pickle.loads((a / "train").read_bytes())
    assert set(train) == {"data", "fine_labels"} and train["data"].shape == (24, 3072)
    assert train["data"].dtype.name == "uint8" and sorted(set(train["fine_labels"])) == list(range(6))
    info = register_cifar100_layout(tmp_path / "a", "shapes")
    assert (info["classes"], info["train"], info["test"]) == (6, 24, 12)


def test_the_example_preset_is_valid_and_reads_the_example_root():
    from tskd.spec.config import load_preset

    p = load_preset(EXAMPLE / "preset.yaml")
    assert p.dataset.name == "cifar100" and p.dataset.root == "data/shapes" and p.dataset.synthetic is None


# -- the message for data that is neither registered nor official ------------------------------------
def test_the_register_message_fits_a_terminal_and_gives_the_command_on_its_own_line(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.chdir(tmp_path)
    msg = _unregistered_error(Path("data/shapes"))  # a preset's root, relative as in params/
    lines = (PREFIX + msg).splitlines()
    assert all(len(line) <= TERMINAL for line in lines), [line for line in lines if len(line) > TERMINAL]
    first = lines[0]
    assert "data/shapes/cifar-100-python" in first and "unregistered, not the official CIFAR-100" in first
    assert "  tskd data register data/shapes --name <name>" in lines  # alone, ready to copy
    assert lines.index("  tskd data register data/shapes --name <name>") == 2  # the facts and the fix first
    why = " ".join(lines[3:5])  # what was expected: a manifest, or the official file
    assert "no tskd_manifest.json" in why and "train does not match the   official md5" in why
    assert CIFAR100.train_list[0][1] in why
    assert "download: true" in msg and "tskd data synth --root data/shapes" in msg


def test_the_register_command_survives_the_one_line_a_workflow_job_prints(tmp_path):
    """Under Snakemake (`tskd --log`) the terminal gets the message as one line of at most
    MAX_LINE characters: with an absolute root the command is still whole in it."""
    from tskd.workflow.joblog import MAX_LINE, one_line

    root = tmp_path / "projects" / "my-lab" / "datasets" / "shapes"
    msg = _unregistered_error(root)
    line = one_line(msg)
    assert len(line) <= MAX_LINE and f"tskd data register {root} --name <name>" in line
    lines = msg.splitlines()
    assert f"  tskd data register {root} --name <name>" in lines
    shown = (PREFIX + msg.replace(str(root), "data/shapes")).splitlines()  # the width of a short root
    assert all(len(ln) <= TERMINAL for ln in shown)


# -- tskd check: a dataset root that does not exist yet -------------------------------------------------
def _preset(tmp_path: Path, **dataset) -> Path:
    raw = yaml.safe_load((EXAMPLE / "preset.yaml").read_text())
    raw["dataset"] = {"name": "cifar100", **dataset}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _check(params: Path, capsys) -> tuple[int, str, str]:
    from tskd.cli import main

    rc = main(["check", str(params)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("relative", [True, False], ids=["relative", "absolute"])
def test_check_warns_when_the_dataset_root_does_not_exist(tmp_path, monkeypatch, capsys, relative):
    monkeypatch.chdir(tmp_path)
    root = "data/shapes" if relative else str(tmp_path / "data" / "shapes")
    params = _preset(tmp_path, root=root)
    rc, out, err = _check(params, capsys)
    assert rc == 0 and f"{params}: ok" in out  # the data may come later: still valid
    lines = err.splitlines()
    assert lines[0] == f"{params}: warning: dataset.root: {root} does not exist"
    if relative:
        assert str(tmp_path / "data" / "shapes") in lines[1]  # where a relative root points from here
    assert "cifar-100-python/" in err and "dvc pull" in err and "put the files there" in err
    assert all(len(ln.replace(str(tmp_path), "")) <= TERMINAL for ln in lines)


@pytest.mark.parametrize("dataset", [
    {"synthetic": {"seed": 0, "train_per_class": 2, "test_per_class": 1}},  # writes its own data
    {"root": "data/cifar100", "download": True},  # fetches the official release into its root
    {"root": "EXISTS"},
], ids=["synthetic", "download", "existing"])
def test_check_does_not_warn_when_the_data_needs_nothing_or_is_there(tmp_path, monkeypatch, capsys, dataset):
    monkeypatch.chdir(tmp_path)
    if dataset.get("root") == "EXISTS":
        dataset = {"root": str(tmp_path / "data")}
        (tmp_path / "data").mkdir()
    rc, out, err = _check(_preset(tmp_path, **dataset), capsys)
    assert rc == 0 and ": ok (" in out and err == ""


# -- the example end to end, as the docs tell it -----------------------------------------------------------
@pytest.mark.slow
def test_the_own_data_example_runs_end_to_end(tmp_path):
    """The five steps of docs/data.md on a tiny version of the example: write, register, check,
    the real Snakemake DAG, the report."""
    repo = copy_repo(tmp_path / "repo")
    data = tmp_path / "data" / "shapes"
    r = subprocess.run([sys.executable, "examples/own_data/write_dataset.py", str(data), "--train-per-class", "8",
                        "--test-per-class", "4"], cwd=repo, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = run_cli("data", "register", str(data), "--name", "shapes", cwd=repo)
    assert r.returncode == 0, r.stderr
    assert "6 classes, 48 train / 24 test images" in r.stdout

    raw = yaml.safe_load((repo / "examples/own_data/preset.yaml").read_text())
    raw["dataset"]["root"] = str(data)
    raw["results_dir"] = str(tmp_path / "results")
    tiny = {"epochs": 2, "batch_size": 16, "milestones": [1]}
    raw["recipes"] = {name: recipe | tiny for name, recipe in raw["recipes"].items()}
    raw["methods"] = {m: raw["methods"][m] for m in ("vanilla", "kd", "dkd")}
    assert raw["seeds"] == [0] and len(raw["pairs"]) == 1
    params = tmp_path / "own_data.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))

    r = run_cli("check", str(params), cwd=repo)
    assert r.returncode == 0 and f"{params}: ok" in r.stdout and "warning" not in r.stderr, r.stderr

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(params)], cwd=repo,
                       capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]

    md = (tmp_path / "results" / "own_data" / "report.md").read_text()
    assert "dataset `shapes`" in md  # the name it was registered under
    table = md.split("## Recipe `student`: best test top-1 (%)")[1].split("## ")[0]
    rows = [ln.split(" | ")[0].removeprefix("| ") for ln in table.splitlines() if ln.startswith("| ")][1:]
    # Each method in the preset's order (the table may hold other rows too, e.g. the networks' cost).
    assert [row for row in rows if row in {"teacher", "student alone", "kd", "dkd"}] == [
        "teacher", "student alone", "kd", "dkd"]
