"""TSKD with ``compile: true``: the compiled snapshot forwards and attention maps compute what the
eager ones do, and a machine that cannot compile says so, naming the param, before training."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import needs_cxx
from tests.test_tskd import SHORT, batch, fill, make

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize(("teacher", "student"), [("resnet20", "resnet8"), ("resnet8", "MobileNetV2")])
def test_compiled_review_step_matches_eager(teacher, student):
    """Losses and every gradient; MobileNetV2's taps are smaller than the teacher's (pooled)."""
    x, y = batch()
    results = []
    for compiled in (False, True):
        d = make(student, teacher, params=dict(SHORT, compile=compiled))
        fill(d, 2)
        with torch.no_grad():  # away from the last snapshot: |S - Mk| near 0 has a rounding-chosen sign
            for i, w in enumerate(d.student.parameters()):
                w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(i)), alpha=0.01)
        _, losses = d.forward_train(x, y, 2)
        losses["review"].backward()  # the only loss the compiled parts feed
        results.append((losses, {n: p.grad for n, p in d.named_parameters() if p.grad is not None}))
    (want_losses, want_grads), (losses, grads) = results
    for name in want_losses:
        torch.testing.assert_close(losses[name], want_losses[name], rtol=1e-5, atol=1e-7, msg=name)
    assert grads.keys() == want_grads.keys()
    forecaster = [n for n in grads if n.startswith("forecasters.")]
    student = [n for n in grads if n.startswith("student.")]
    assert forecaster and student
    for name in forecaster:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    # The student's gradient as one vector: a few of its tensors (BatchNorm biases before another
    # BatchNorm) are sums that cancel to ~1e-6, where any change of rounding shows.
    got, want = (torch.cat([g[n].flatten() for n in student]) for g in (grads, want_grads))
    assert want.norm() > 0 and (got - want).norm() / want.norm() < 1e-4


@pytest.mark.slow
def test_no_compiler_fails_before_training_naming_the_param(tmp_path, repo_root):
    """A machine without a C++ compiler (here: CXX points nowhere, and a fresh inductor cache so
    nothing compiled earlier is reused) must fail at the first epoch start, before a step."""
    code = ("from tests.test_tskd import SHORT, make\n"
            "d = make(params=dict(SHORT, compile=True))\n"
            "d.on_epoch_start(0)\n"
            "print('no error')\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ic")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=repo_root)
    assert res.returncode != 0, res.stdout
    err = res.stderr[-3000:]
    assert "methods.tskd.compile: true" in err and "methods.tskd.compile: false" in err, err
    assert "no error" not in res.stdout


@pytest.mark.slow
@needs_cxx
def test_train_compile_trains_the_same_network(make_spec):
    """``train.compile``: the compiled student and teacher train to what eager ones do (to float
    rounding) and the exported model has the architecture's own state_dict keys."""
    from pathlib import Path

    from tskd.engine.trainer import train
    from tskd.spec.config import TrainCfg

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    runs = {}
    for compiled in (False, True):
        spec = make_spec(out=f"kd-{compiled}", method="kd", teacher_arch="resnet8",
                         teacher_path=str(Path(teacher.out_dir) / "model.pt"),
                         recipe={"epochs": 1, "milestones": [], "augment": []},
                         train=TrainCfg(device="cpu", threads=1, compile=compiled))
        runs[compiled] = (train(spec), torch.load(Path(spec.out_dir) / "model.pt", weights_only=True))
    (eager, eager_file), (comp, comp_file) = runs[False], runs[True]
    assert comp_file["model"].keys() == eager_file["model"].keys()
    for key in ("train_loss", "test_loss"):
        assert comp["history"][0][key] == pytest.approx(eager["history"][0][key], rel=1e-4), key
