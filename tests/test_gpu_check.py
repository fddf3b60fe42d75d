"""benchmarks/gpu_check.py --tiny, run as a subprocess on the CPU so the GPU check cannot rot.

The GPU machine runs the same script at full size; here every code path (correctness comparison,
device data path, epoch and pure-compute timing, projection, table) runs on tiny sizes, and the
one table it prints must hold every row, with numbers where numbers belong.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _num(cell: str) -> float:
    value = float(cell)  # raises on anything but a number
    assert math.isfinite(value), cell
    return value


@pytest.fixture(scope="module")
def table(repo_root) -> dict[tuple[str, str, str], dict[str, str]]:
    res = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "gpu_check.py"), "--tiny"],
                         cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert lines and all(line.startswith("|") for line in lines), f"stdout is not one table:\n{res.stdout}"
    header, rule, *body = ([c.strip() for c in line.strip().strip("|").split("|")] for line in lines)
    assert header == ["section", "case", "metric", "value", "goal", "status", "detail"]
    assert set("".join(rule)) == {"-"}
    rows = {}
    for cells in body:
        assert len(cells) == len(header), cells
        row = dict(zip(header, cells, strict=True))
        rows[row["section"], row["case"], row["metric"]] = row
    return rows


def _rows(table, section: str, case_start: str, metric: str | None = None) -> list[dict[str, str]]:
    found = [r for (s, c, m), r in table.items() if s == section and c.startswith(case_start)
             and (metric is None or m == metric)]
    assert found, f"no row {section} / {case_start}* / {metric}; rows: {sorted(table)}"
    return found


def test_env_rows_say_where_it_ran(table):
    assert _rows(table, "env", "torch")[0]["value"].startswith("2.")
    assert "CPU" in _rows(table, "env", "device")[0]["value"]
    assert _rows(table, "env", "runtime")[0]["value"] == "fp32"
    assert _num(_rows(table, "env", "data")[0]["value"]) > 0
    assert _num(_rows(table, "env", "this check")[0]["value"]) > 0


@pytest.mark.parametrize("step", ["kd step", "tskd review step"])
def test_correctness_rows_pass(table, step):
    loss = _rows(table, "correctness", step, "loss rel. diff (worst term)")
    grads = _rows(table, "correctness", step, "student grads ‖Δ‖/‖ref‖")
    for row in loss + grads:
        assert _num(row["value"]) >= 0
        assert _num(row["goal"].removeprefix("<= ")) > 0
        assert row["status"] == "PASS", row
    if step.startswith("tskd"):
        assert "review=" in loss[0]["detail"]  # the review term was computed and compared


@pytest.mark.parametrize("case", ["kd", "tskd general", "tskd review"])
def test_throughput_rows(table, case):
    for metric in ("img/s", "ratio"):
        rows = _rows(table, "throughput", f"{case}:", metric)
        assert all(_num(r["value"]) > 0 for r in rows)
    ratio = _rows(table, "throughput", f"{case}: epoch ÷ pure compute", "ratio")[0]
    assert ratio["goal"] == ">= 0.9" and ratio["status"] == "n/a (cpu)"  # a CUDA goal


def test_projection_and_memory_rows(table):
    proj = _rows(table, "projection", "tskd 240 epochs", "minutes")[0]
    assert _num(proj["value"]) > 0 and proj["goal"] == "<= 15"
    assert "12 review" in proj["detail"] and "36 memory" in proj["detail"]  # summarize_schedule(240, 5, 3)
    mem = _rows(table, "memory", "tskd peak ÷ kd peak", "ratio")[0]
    assert mem["value"] == "n/a" and mem["status"] == "n/a (cpu)"


def test_data_without_the_device_loader(repo_root, monkeypatch):
    """The fallback batches (a checkout without tskd.data.device_loader): every image once per epoch,
    normalised as ToTensor + Normalize would, and the table says no augmentation ran."""
    import contextlib
    import importlib.util
    from types import SimpleNamespace

    import torch

    from tskd.engine.runtime import Runtime

    spec = importlib.util.spec_from_file_location("gpu_check", repo_root / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setattr(gpu_check, "DeviceTrainSet", None)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    setup = SimpleNamespace(args=SimpleNamespace(train_size=40), rt=Runtime(torch.device("cpu"), contextlib.nullcontext,
                            "fp32"), mean=mean, std=std, recipe=SimpleNamespace(augment=("crop", "flip")))
    data = gpu_check.Data(setup)
    assert "no augmentation" in data.what and data.steps(16) == 3
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    seen = []
    for x, y, idx in data.epoch(16, seed=0):
        want = (data.images[idx].float() / 255 - m) / s
        torch.testing.assert_close(x, want)
        assert torch.equal(y, data.labels[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(40))
