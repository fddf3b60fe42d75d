"""A disk that fills while a checkpoint, model.pt or metrics.json is written (issue #22 §2).

The filesystem is a real one that fills: a small tmpfs mounted for the test (root only, else the
tests are skipped), so the ENOSPC comes from the kernel, in the middle of the write, wherever the
writer (torch.save's zip writer, a buffered file) happens to be. What is checked: the job stops
with one line naming the file, that the disk is full and how much is free; the last complete
checkpoint and no temporary file are left; once there is space, a rerun resumes from that
checkpoint and ends with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tskd import cli
from tskd.engine import checkpoint
from tskd.errors import DiskFullError, TskdError
from tskd.io import atomic_torch_save, atomic_write, atomic_write_bytes

LEAVE = 64 * 1024  # free bytes left by the ballast: less than a checkpoint (~700 KB) or model.pt (~350 KB)


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (created) for the block; the test is skipped where mount is refused."""
    if not sys.platform.startswith("linux") or not shutil.which("mount"):
        pytest.skip("needs Linux and mount(8) to make a small filesystem that fills")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root (CAP_SYS_ADMIN); not root here")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount -t tmpfs refused ({r.stderr.strip() or r.returncode}): no CAP_SYS_ADMIN here "
                    "(an unprivileged container?)")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)  # busy: detach it anyway


@pytest.fixture
def disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB filesystem: room for a run's checkpoints until a ballast fills it."""
    with tmpfs(tmp_path / "disk", "size=4m") as d:
        yield d


def fill(disk: Path, leave: int = LEAVE) -> Path:
    """Write a ballast file until ``leave`` bytes are free on ``disk``; returns it (delete it to free the space)."""
    ballast = disk / "ballast"
    todo = shutil.disk_usage(disk).free - leave
    with open(ballast, "wb") as f:
        while todo > 0:
            todo -= f.write(b"\0" * min(todo, 1 << 20))
    assert shutil.disk_usage(disk).free <= leave
    return ballast


def temporaries(d: Path) -> list[Path]:
    return sorted(d.rglob(".*.tmp"))


def files(d: Path) -> list[str]:
    """What a run directory holds, but for hidden files (a run's lock; temporaries are checked apart)."""
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def history(metrics: dict, seconds: bool = False) -> list[dict]:
    # Wall-clock seconds are the only field allowed to differ between two runs.
    return [{k: v for k, v in row.items() if seconds or k != "seconds"} for row in metrics["history"]]


# -- atomic_write itself ---------------------------------------------------------------------


def test_a_full_disk_leaves_the_file_and_its_predecessor_and_no_temporary(disk):
    path, prev = disk / "run" / "checkpoint.pt", disk / "run" / "checkpoint.prev.pt"
    atomic_torch_save(path, {"epoch": 1, "w": torch.zeros(10_000)}, keep_previous=prev)
    atomic_torch_save(path, {"epoch": 2, "w": torch.ones(10_000)}, keep_previous=prev)
    fill(disk)
    with pytest.raises(DiskFullError) as e:
        atomic_torch_save(path, {"epoch": 3, "w": torch.ones(100_000)}, keep_previous=prev)  # 400 KB
    assert isinstance(e.value, TskdError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: cannot write it") and "disk (or its quota) is full" in msg
    free = shutil.disk_usage(disk).free  # the temporary file's space is given back before this is said
    assert e.value.free == free and f"({free} bytes) free on {disk} now" in msg
    assert "checkpoint.pt there is unchanged" in msg
    assert torch.load(path)["epoch"] == 2 and torch.load(prev)["epoch"] == 1  # nothing renamed
    assert temporaries(disk) == []


def test_a_full_disk_while_a_new_file_is_written_leaves_nothing(disk):
    fill(disk)
    target = disk / "metrics.json"
    with pytest.raises(DiskFullError, match=r"metrics\.json: cannot write it, .* is full .*No metrics\.json was left"):
        atomic_write_bytes(target, b"{}" * LEAVE)
    assert not target.exists() and temporaries(disk) == []


def test_no_inode_left_for_the_temporary_file_is_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "inodes", "size=1m,nr_inodes=3") as d:  # the root and two files
        (d / "a").write_bytes(b"a")
        (d / "b").write_bytes(b"b")
        with pytest.raises(DiskFullError, match="is full"):
            atomic_write_bytes(d / "c", b"c")


def test_a_quota_reported_at_fsync_is_named_and_other_errors_pass_through(tmp_path, monkeypatch):
    """NFS and Lustre may report EDQUOT only when the data is flushed; EIO is not a full disk."""
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")

    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EDQUOT))
    with pytest.raises(DiskFullError, match="disk quota is full .*quota") as e:
        atomic_write_bytes(target, b"new")
    assert e.value.errno == errno.EDQUOT and str(target) in str(e.value)
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, b"new")
    assert type(e.value) is OSError and e.value.errno == errno.EIO
    monkeypatch.undo()
    with pytest.raises(ValueError):
        atomic_write(target, lambda f: (f.write(b"x"), int("not a number")))
    assert target.read_bytes() == b"old" and temporaries(tmp_path) == []


# -- a training run --------------------------------------------------------------------------

RECIPE = {"epochs": 3, "milestones": [2]}


@pytest.fixture(scope="module")
def reference(tiny_cifar, tmp_path_factory, one_thread) -> tuple[dict, dict]:
    """An uninterrupted run (on an ordinary disk): its metrics and its exported weights."""
    from tskd.engine.trainer import train

    spec = _spec(tiny_cifar, tmp_path_factory.mktemp("reference"))
    metrics = train(spec)
    return metrics, torch.load(Path(spec.out_dir) / "model.pt", weights_only=True)["model"]


def _spec(root: Path, out: Path):
    from tskd.spec.config import Cifar100Data, RecipeCfg, TrainCfg
    from tskd.spec.grid import RunSpec

    return RunSpec(preset="test", role="student", method="vanilla", arch="resnet8", seed=0,
                   dataset=Cifar100Data(root=str(root)),
                   recipe=RecipeCfg(batch_size=50, lr=0.05, **RECIPE),
                   train=TrainCfg(device="cpu", threads=1), out_dir=str(out), experiment="tskd-test")


def fill_after(monkeypatch, disk: Path, name: str, epoch: int, leave: int = LEAVE) -> list[Path]:
    """Fill ``disk`` right after the file ``name`` (checkpoint.pt, model.pt) of ``epoch`` is in place; the
    list gets the ballast. The hook only decides when the disk fills: the writes that fail are real."""
    real, ballast = checkpoint.atomic_torch_save, []

    def save(path, obj, keep_previous=None):
        out = real(path, obj, keep_previous)
        if Path(path).name == name and obj["epoch"] == epoch and not obj.get("partial"):
            ballast.append(fill(disk, leave))
        return out

    monkeypatch.setattr(checkpoint, "atomic_torch_save", save)
    return ballast


def train_cli(spec, capsys) -> tuple[int, str]:
    """``tskd train`` (its main(), in this process: the hook above applies)."""
    rc = cli.main(["train", "--no-track", "--spec", spec.model_dump_json()])
    return rc, capsys.readouterr().err


def test_disk_full_at_a_checkpoint_stops_then_the_rerun_resumes_to_the_same_numbers(
        disk, tiny_cifar, reference, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    spec = _spec(tiny_cifar, disk / "run")
    out = Path(spec.out_dir)
    ballast = fill_after(monkeypatch, disk, "checkpoint.pt", epoch=1)  # epoch 2's checkpoint will not fit

    rc, err = train_cli(spec, capsys)
    line = one_error_line(err)
    assert rc == 2
    assert line.startswith(f"tskd train: error: {out / 'checkpoint.pt'}: cannot write it, the disk")
    assert "is full (No space left on device)" in line and "bytes) free on" in line
    assert files(out) == ["checkpoint.pt"] and temporaries(disk) == []  # no model.pt, no metrics.json
    kept = checkpoint.load_checkpoint(out / "checkpoint.pt")
    assert kept["epoch"] == 1 and [r["epoch"] for r in kept["history"]] == [1]

    ballast[0].unlink()  # space freed
    monkeypatch.undo()
    caplog.clear()
    rc, err = train_cli(spec, capsys)
    assert rc == 0, err
    assert f"resuming {out} at epoch 2" in caplog.text
    assert "resnet8 epoch 1/3" not in caplog.text and "resnet8 epoch 2/3" in caplog.text  # one epoch lost
    resumed = json.loads((out / "metrics.json").read_text())
    ref, ref_model = reference
    assert history(resumed) == history(ref)  # to the last digit
    assert resumed["history"][0] == kept["history"][0]  # epoch 1 as the checkpoint had it (its seconds too)
    model = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    assert not list(out.glob("checkpoint*")) and temporaries(disk) == []


@pytest.mark.parametrize(("failing", "after", "leave", "left"), [
    ("model.pt", "checkpoint.pt", LEAVE, []),  # model.pt (~350 KB) does not fit in what is left
    ("metrics.json", "model.pt", 0, ["model.pt"]),  # no page left for metrics.json
])
def test_disk_full_at_the_end_stops_then_the_rerun_trains_no_epoch_again(
        failing, after, leave, left, disk, tiny_cifar, reference, monkeypatch, capsys, caplog):
    caplog.set_level(logging.INFO)
    spec = _spec(tiny_cifar, disk / "run")
    out = Path(spec.out_dir)
    last = RECIPE["epochs"]
    ballast = fill_after(monkeypatch, disk, after, epoch=last, leave=leave)

    rc, err = train_cli(spec, capsys)
    line = one_error_line(err)
    assert rc == 2
    assert line.startswith(f"tskd train: error: {out / failing}: cannot write it") and " is full " in line
    assert f"No {failing} was left" in line
    # The last checkpoint, and no metrics.json: the run is not taken for finished.
    assert files(out) == sorted(["checkpoint.prev.pt", "checkpoint.pt", *left]) and temporaries(disk) == []
    kept = checkpoint.load_checkpoint(out / "checkpoint.pt")
    assert kept["epoch"] == last

    ballast[0].unlink()
    monkeypatch.undo()
    caplog.clear()
    rc, err = train_cli(spec, capsys)
    assert rc == 0, err
    assert f"resuming {out} at epoch {last + 1}" in caplog.text
    assert " epoch " not in caplog.text.replace(f"at epoch {last + 1}", "")  # no epoch trained again
    resumed = json.loads((out / "metrics.json").read_text())
    assert history(resumed, seconds=True) == history({"history": kept["history"]}, seconds=True)
    ref, ref_model = reference
    assert history(resumed) == history(ref)
    model = torch.load(out / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(model[k], ref_model[k]) for k in ref_model)
    assert not list(out.glob("checkpoint*")) and temporaries(disk) == []
