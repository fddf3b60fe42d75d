"""TSKD's ablation params (target, sequence, forecaster) and the predictability monitors: each variant
changes what it says, the defaults are the authors' step bit for bit, and the monitors reach the
history (review epochs only), survive a mid-epoch resume, go to MLflow and change no other number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.kill import KillAt
from tests.test_tskd import SHORT, _strip, batch, fill, make
from tskd.distill.tskd.attention import attention_map, increment_sequence
from tskd.distill.tskd.convlstm import forecast

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

COLUMNS = ("train_forecast_mse", "train_last_increment_mse", "train_predictability")


def _inputs(d, x):
    """The review step's inputs as review_loss sees them: every snapshot's maps, the student's and the
    teacher's feature taps."""
    with torch.no_grad():
        memory = [d._snapshot_maps(s, x.contiguous(memory_format=torch.channels_last)) for s in d.memory.snapshots()]
    return memory, d.student(x)[1]["feats"], d.teacher_forward(x)[1]["preact_feats"]


def _grads(d):
    return {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}


def test_default_review_step_is_the_authors_bit_for_bit():
    """The review loss and every gradient of a default step equal the authors' formula written out here
    (the code before the ablation params): sum_l MSE(ConvLSTM_l(increments), |S_l - T_l|)."""
    d = make()
    assert (d.params.target, d.params.sequence, d.params.forecaster) == ("dynamic", "increments", "convlstm")
    fill(d, 2)
    x, _ = batch()
    memory, s_feats, t_feats = _inputs(d, x)
    got = d.review_loss(x, s_feats, t_feats)
    got.backward(retain_graph=True)  # the same student graph serves the hand-written loss
    got_grads = _grads(d)
    d.zero_grad(set_to_none=True)
    want = x.new_zeros(())
    for branch, (tap, f) in enumerate(zip(d.params.taps, d.forecasters, strict=True)):
        s, t = attention_map(s_feats[tap]), attention_map(t_feats[tap])
        frames = increment_sequence([m[branch] for m in memory], s)
        want = want + F.mse_loss(forecast(f, frames, True), (s - t).abs())
    want.backward()
    want_grads = _grads(d)
    assert torch.equal(got, want) and got_grads.keys() == want_grads.keys()
    assert any(n.startswith("forecasters") for n in got_grads) and any(n.startswith("student") for n in got_grads)
    assert all(torch.equal(got_grads[n], want_grads[n]) for n in got_grads)


def test_targets_and_sequences():
    """static = the teacher's map, signed = S - T (negative somewhere), dynamic = |signed|; raw frames
    are the maps M2..Mk, S themselves, as many as the increments."""
    x, _ = batch()
    out = {}
    for target, sequence in (("dynamic", "increments"), ("static", "increments"), ("signed", "raw")):
        d = make(params=dict(SHORT, k=3, target=target, sequence=sequence), epochs=10)  # review at 3
        fill(d, 3)
        memory, s_feats, t_feats = _inputs(d, x)
        maps = [m[0] for m in memory]
        frames, tgt = d._branch_inputs(maps, s_feats[0], t_feats[0])
        out[target] = s, t, frames, tgt = attention_map(s_feats[0]), attention_map(t_feats[0]), frames, tgt
        assert frames.shape == (3, 4, 1, 32, 32)
        if sequence == "raw":
            assert torch.equal(frames, torch.stack([maps[1], maps[2], s]))
        else:
            assert torch.equal(frames, increment_sequence(maps, s))
    s, t, _, static = out["static"]
    assert torch.equal(static, t) and not static.requires_grad  # no gradient to the student through T
    s, t, _, signed = out["signed"]
    assert torch.equal(signed, s - t) and (signed < 0).any() and (signed > 0).any()
    assert torch.equal(out["dynamic"][3], signed.abs())


def test_last_increment_forecaster_has_no_parameters_and_forecasts_the_last_frame():
    d = make(params=dict(SHORT, forecaster="last_increment"))
    assert not list(d.forecasters.parameters()) and not any(k.startswith("forecasters") for k in d.state_dict())
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.student.parameters()}
    assert d.every_parameter_every_step and not d.keep_zeroed_grads()
    assert not make().every_parameter_every_step  # the ConvLSTM sits out the non-review steps
    fill(d, 2)
    x, _ = batch()
    memory, s_feats, t_feats = _inputs(d, x)
    got = d.review_loss(x, s_feats, t_feats)
    want = x.new_zeros(())
    for b, tap in enumerate(d.params.taps):
        s, t = attention_map(s_feats[tap]), attention_map(t_feats[tap])
        want = want + F.mse_loss(increment_sequence([m[b] for m in memory], s)[-1], (s - t).abs())
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward()
    assert d.student.conv1.weight.grad.abs().sum() > 0  # |S - Mk| vs |S - T| still teaches the student
    monitors = d.take_monitors()
    assert torch.equal(monitors["forecast_mse"], monitors["last_increment_mse"])
    assert d.derived_monitors({"forecast_mse": 2.0, "last_increment_mse": 2.0}) == {"predictability": 1.0}


def test_monitors_are_the_unweighted_review_loss_and_the_last_frames_mse():
    d = make(params=dict(SHORT, review_weight=0.5))
    x, y = batch()
    d.forward_train(x, y, 0)
    assert d.take_monitors() == {}  # memory epoch: nothing measured
    fill(d, 2)
    losses = d.forward_train(x, y, 2)[1]
    assert set(losses) == {"ce", "kd", "review"}  # the monitors are no loss terms
    m = d.take_monitors()
    assert set(m) == {"forecast_mse", "last_increment_mse"} and d.take_monitors() == {}
    assert not m["forecast_mse"].requires_grad and m["last_increment_mse"] > 0
    torch.testing.assert_close(m["forecast_mse"] * 0.5, losses["review"].detach())
    d = make(params=dict(SHORT, measure_predictability=False))
    fill(d, 2)
    d.forward_train(x, y, 2)
    assert d.take_monitors() == {}


@pytest.mark.slow
def test_predictability_in_the_history_mlflow_and_a_mid_epoch_resume(make_spec, mlflow_uri):
    """Through the trainer (memory 1, 2 | review 3 | memory 4): the columns exist in the review epoch
    only, are >= 0, go to MLflow; measuring changes no other column; a run killed inside the review
    epoch resumes to the same history, monitors included; last_increment trains end to end."""
    from mlflow.tracking import MlflowClient

    from tskd.engine import trainer as trainer_mod
    from tskd.spec.config import TrainCfg
    from tskd.tracking.observer import TrackingObserver

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    trainer_mod.train(teacher)

    def spec(out, **params):
        return make_spec(out=out, method="tskd", teacher_arch="resnet8", teacher_path=f"{teacher.out_dir}/model.pt",
                         method_params={"delta": 1, "k": 2, **params}, recipe={"epochs": 4, "milestones": []},
                         train=TrainCfg(device="cpu", threads=1, checkpoint_minutes=1e-9, check_finite_every=1))

    whole = trainer_mod.train(spec("whole"), observers=[TrackingObserver()])
    rows = whole["history"]
    assert [r["train_predictability"] is not None for r in rows] == [False, False, True, False]
    review = rows[2]
    assert all(review[c] >= 0 for c in COLUMNS) and all(rows[i][c] is None for i in (0, 1, 3) for c in COLUMNS)
    assert review["train_predictability"] == review["train_forecast_mse"] / review["train_last_increment_mse"]
    assert json.loads((Path(spec("whole").out_dir) / "metrics.json").read_text())["history"] == rows
    run_id = json.loads((Path(spec("whole").out_dir) / "mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=mlflow_uri)
    for c in COLUMNS:
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, c)] == [(3, review[c])]

    unmeasured = trainer_mod.train(spec("unmeasured", measure_predictability=False))
    assert _strip(unmeasured) == [{k: v for k, v in r.items() if k not in COLUMNS} for r in _strip(whole)]

    # Killed inside the review epoch, in its 4th step (of 6), right after the checkpoint 3 steps in.
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(spec("resumed"), observers=[KillAt(2, step=3)])
    state = torch.load(Path(spec("resumed").out_dir) / "checkpoint.pt", weights_only=False)
    assert set(state["partial"]["monitors"]) == {"forecast_mse", "last_increment_mse"}
    assert _strip(trainer_mod.train(spec("resumed"))) == _strip(whole)

    last = trainer_mod.train(spec("last", forecaster="last_increment"))["history"][2]
    assert last["train_review"] > 0 and last["train_predictability"] == 1.0
    assert last["train_forecast_mse"] == last["train_last_increment_mse"]
