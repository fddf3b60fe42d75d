"""TSKD: schedule, attention maps, increments, ConvLSTM, snapshot memory, the distiller on every pair."""

from __future__ import annotations

import io
import math

import pytest
import torch

from tests.conftest import needs_cxx
from tests.kill import KillAt
from tskd.distill import DistillContext, build_distiller, method_class, parse_method_params
from tskd.distill.tskd.attention import attention_map, increment_sequence
from tskd.distill.tskd.convlstm import IncrementForecaster, _Gates, auto_hidden, recomputed_branches
from tskd.distill.tskd.prefix import TapPrefix, _BatchNormInPlace
from tskd.distill.tskd.schedule import cycle_memory_epochs, node_at, summarize_schedule
from tskd.engine.events import Observer
from tskd.models import create_model

PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"),
         ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
         ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2")]
SHORT = {"delta": 1, "k": 2}  # E=8: memory 0, 1 | review 2 | memory 3, 4 | review 5 | memory 6, 7


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make(student="resnet8", teacher="resnet8", params=None, epochs=8, seed=0):
    torch.manual_seed(seed)
    ctx = DistillContext(num_classes=100, image_size=(32, 32), epochs=epochs, num_train=16)
    d = build_distiller("tskd", create_model(student), create_model(teacher), params or dict(SHORT), ctx)
    return d.train()


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g)


def fill(d, review_epoch):
    """Take the snapshots of ``review_epoch``'s cycle, the student moving a little before each one
    (as training would: identical snapshots give all-zero increments)."""
    p = d.params
    g = torch.Generator().manual_seed(review_epoch)
    for e in cycle_memory_epochs(review_epoch, p.delta, p.k):
        with torch.no_grad():
            for w in d.student.parameters():
                w.add_(torch.randn(w.shape, generator=g), alpha=0.01)
        d.on_epoch_end(e)
    d.on_epoch_start(review_epoch)


def step(d, epoch, images, labels, lr=0.1):
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=lr)
    opt.zero_grad(set_to_none=True)
    _, losses = d.forward_train(images, labels, epoch)
    sum(losses.values()).backward()
    opt.step()
    return losses


# -- schedule ---------------------------------------------------------------------------------
def test_authors_schedule_240_epochs():
    s = summarize_schedule(240, 5, 3)
    assert s.counts == {"memory": 36, "review": 12, "general": 192}
    assert s.memory_epochs == (tuple(range(0, 240, 20)), tuple(range(5, 240, 20)), tuple(range(10, 240, 20)))
    assert s.review_epochs == tuple(range(15, 240, 20))
    assert s.review_epochs[-1] == 235
    assert node_at(0, 240, 5, 3).slot == 0 and node_at(225, 240, 5, 3).slot == 1
    assert node_at(1, 240, 5, 3).kind == "general" and node_at(239, 240, 5, 3).kind == "general"
    assert cycle_memory_epochs(235, 5, 3) == (220, 225, 230)
    with pytest.raises(ValueError):
        node_at(240, 240, 5, 3)


def test_short_schedules():
    s = summarize_schedule(8, 1, 2)
    assert s.memory_epochs == ((0, 3, 6), (1, 4, 7)) and s.review_epochs == (2, 5) and s.general_epochs == ()
    s = summarize_schedule(10, 2, 1)
    assert s.memory_epochs == ((0, 4, 8),) and s.review_epochs == (2, 6)
    assert s.general_epochs == (1, 3, 5, 7, 9)
    assert summarize_schedule(4, 1, 3).review_epochs == (3,)


@pytest.mark.parametrize(("raw", "epochs", "words"), [
    ({"k": 3}, 8, ["methods.tskd.k=3", "exceeds", "methods.tskd.delta=5", "epochs 0, 5"]),
    ({"k": 2}, 8, ["no review epoch", "methods.tskd.k=2", "methods.tskd.delta"]),
    ({"delta": 20}, 30, ["methods.tskd.k=3", "exceeds", "epochs 0"]),
])
def test_check_schedule_refuses_runs_without_review(raw, epochs, words):
    cls = method_class("tskd")
    with pytest.raises(ValueError) as e:
        cls.check_schedule(parse_method_params("tskd", raw), epochs=epochs)
    for w in words:
        assert w in str(e.value)
    cls.check_schedule(parse_method_params("tskd", {}), epochs=240)
    cls.check_schedule(parse_method_params("tskd", {"k": 1}), epochs=8)


def test_params_defaults_and_validation():
    p = parse_method_params("tskd", {})
    assert (p.T, p.ce_weight, p.kd_weight, p.review_weight, p.delta, p.k) == (4.0, 1.0, 1.0, 1.0, 5, 3)
    assert (p.at_norm, p.detach_target, p.snapshot_bn, p.taps, p.hidden_channels) == ("column", False, "train",
                                                                                       (0, 1, 2), None)
    with pytest.raises(ValueError, match="methods.tskd"):
        parse_method_params("tskd", {"hidden_channels": [64, 32]})
    with pytest.raises(ValueError, match="methods.tskd.kk"):
        parse_method_params("tskd", {"kk": 1})
    with pytest.raises(ValueError, match="methods.tskd.at_norm"):
        parse_method_params("tskd", {"at_norm": "rows"})


# -- attention maps and increments --------------------------------------------------------------
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_map_by_hand(memory_format):
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    x = x.contiguous(memory_format=memory_format)
    # mean over channels of x^2: [[1, 2], [5, 8]]
    col = attention_map(x, "column")
    assert col.shape == (1, 1, 2, 2)
    want = torch.tensor([[1 / math.sqrt(26), 2 / math.sqrt(68)], [5 / math.sqrt(26), 8 / math.sqrt(68)]])
    torch.testing.assert_close(col[0, 0], want)
    flat = attention_map(x, "flat")
    torch.testing.assert_close(flat[0, 0], torch.tensor([[1.0, 2.0], [5.0, 8.0]]) / math.sqrt(94))


@pytest.mark.parametrize("norm", ["column", "flat"])
def test_attention_map_is_the_same_in_both_layouts(norm):
    """Channels-last features take another kernel (a channel norm); value and gradient must agree,
    also at pixels where every channel is zero, as after a ReLU."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 6, 5, 4))
    x[:, :, 1, 2] = 0
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        leaf = x.clone().contiguous(memory_format=memory_format).requires_grad_()
        a = attention_map(leaf, norm)
        (a * torch.linspace(-1, 2, a.numel()).view_as(a)).sum().backward()
        results.append((a, leaf.grad))
    (a, grad), (a_cl, grad_cl) = results
    torch.testing.assert_close(a_cl, a)
    torch.testing.assert_close(grad_cl, grad)
    assert grad.abs().sum() > 0 and torch.isfinite(grad_cl).all()


def test_increment_sequence_by_hand():
    m1, m2, m3, s = (torch.full((1, 1, 1, 1), v) for v in (1.0, 4.0, 2.0, 7.0))
    seq = increment_sequence([m1, m2, m3], s)
    assert seq.shape == (3, 1, 1, 1, 1)
    assert seq.flatten().tolist() == [3.0, 2.0, 5.0]  # |M1-M2|, |M2-M3|, |S-M3|
    assert increment_sequence([m1], s).flatten().tolist() == [6.0]  # k = 1: only the current increment


# -- ConvLSTM ---------------------------------------------------------------------------------
def _naive_forecast(f: IncrementForecaster, frames: torch.Tensor) -> torch.Tensor:
    """The authors' formulation: one conv over [x; h] each step, zero states, zero forecaster input."""
    def cell(c, x, h, cs):
        i, fg, g, o = c.conv(torch.cat([x, h], 1)).chunk(4, 1)
        cs = torch.sigmoid(fg) * cs + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(cs), cs

    k, b, _, hh, ww = frames.shape
    x = f.down(frames.flatten(0, 1)).unflatten(0, (k, b))
    h = torch.zeros(b, f.encoder.hidden, *x.shape[-2:])
    c = torch.zeros_like(h)
    for t in range(k):
        h, c = cell(f.encoder, x[t], h, c)
    h, _ = cell(f.forecaster, torch.zeros_like(h), h, c)
    return f.up(h)[..., :hh, :ww]


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (5, 9), (1, 1)])
def test_forecaster_matches_authors_formulation_and_keeps_size(size):
    """Forward and backward: the skipped zero terms and the hand-written gate backward change nothing."""
    torch.manual_seed(0)
    f = IncrementForecaster(16)
    frames = torch.rand(3, 2, 1, *size)
    results = []
    for forecast in (f, lambda x: _naive_forecast(f, x)):
        f.zero_grad()
        x = frames.clone().requires_grad_()
        out = forecast(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out, x.grad, {n: p.grad.clone() for n, p in f.named_parameters()}))
    (out, x_grad, grads), (want, want_x_grad, want_grads) = results
    assert out.shape == (2, 1, *size)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_grad, want_x_grad, rtol=1e-4, atol=1e-7)
    assert grads.keys() == want_grads.keys()
    if min(size) >= 5:  # on tinier maps some border taps of a 3x3 kernel never touch a pixel
        assert all(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_gate_backward_is_the_derivative():
    """The gate nonlinearities' hand-written backward against autograd's derivative of the formula
    (float64), for the gradient of h', of c', of both, and with the all-zero first cell. A fresh
    forward each time: the function overwrites its gates (the convolution's output in the
    forecaster) and its backward its saved activations, so gradcheck's repeated backward through
    one graph cannot run on it."""
    torch.manual_seed(0)
    g0 = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    c0 = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    dh, dc = torch.randn_like(c0), torch.randn_like(c0)

    def formula(g, c):
        i, f, gg, o = g.chunk(4, dim=1)
        c_new = torch.sigmoid(i) * torch.tanh(gg) + (0 if c is None else torch.sigmoid(f) * c)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new

    for cell in (c0, None):
        for weights in ((dh, dc), (dh, None), (None, dc)):
            grads = []
            for fn in (lambda g, c: _Gates.apply(g * 1, c)[:2], formula):
                g = g0.clone().requires_grad_()
                c = None if cell is None else cell.clone().requires_grad_()
                loss = sum((out * w).sum() for out, w in zip(fn(g, c), weights, strict=True) if w is not None)
                grads.append(torch.autograd.grad(loss, [g] if c is None else [g, c]))
            for got, want in zip(*grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gate_backward_refuses_a_second_pass():
    """Its backward writes the gradient over the saved activations: a second backward through the
    same graph must fail, not use them."""
    g = torch.randn(2, 8, 3, 3, requires_grad=True)
    h, c, _ = _Gates.apply(g * 1, torch.randn(2, 2, 3, 3))
    (h.sum() + c.sum()).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (h.sum() + c.sum()).backward()


def test_forecaster_channels_last_gives_the_same_forecast():
    torch.manual_seed(0)
    f = IncrementForecaster(16)
    frames = torch.rand(3, 2, 1, 9, 9)
    want = f(frames)
    torch.testing.assert_close(f.to(memory_format=torch.channels_last)(frames), want, rtol=1e-5, atol=1e-6)


def test_hidden_widths_follow_the_authors():
    assert auto_hidden([(32, 32), (32, 32), (16, 16)]) == (64, 64, 32)  # ResNet / WRN students
    assert auto_hidden([(32, 32), (16, 16), (8, 8)]) == (64, 32, 32)  # VGG-8
    d = make("resnet20", "resnet56")
    assert sum(p.numel() for p in d.forecasters.parameters()) == 1_065_211  # docs/method.md: about 1.07 M
    assert [f.encoder.hidden for f in make("vgg8", "vgg13").forecasters] == [64, 32, 32]


# -- snapshot prefix ----------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "last", "truncated"), [("resnet8", 2, True), ("vgg8", 2, True),
                                                         ("vgg8", 4, False)])
def test_snapshot_prefix_equals_full_forward_and_writes_nothing(arch, last, truncated):
    torch.manual_seed(0)
    m = create_model(arch)
    x, _ = batch()
    with torch.no_grad():
        m.train()
        m(x)  # give the running statistics values that differ from the batch's
    tensors = {k: v.clone() for k, v in m.state_dict().items()}
    before = {k: v.clone() for k, v in tensors.items()}
    for train_bn in (True, False):
        prefix = TapPrefix(m, last, (32, 32), train_bn)
        assert prefix.truncated is truncated  # vgg8's tap 4 follows a shape-dependent branch: full forward
        # A cut graph runs its BatchNorms (and ReLUs, residual sums) in place: the values must not move.
        assert any(isinstance(b, _BatchNormInPlace) for b in prefix.module.modules()) is truncated
        with torch.no_grad():
            got = prefix(tensors, x)
            m.load_state_dict(tensors)  # the reference forward in train mode moves m's own statistics
            m.train(train_bn)
            want = m(x)[1]["feats"][: last + 1]
        assert len(got) == last + 1
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert all(torch.equal(tensors[k], before[k]) for k in before)  # no running-statistics update


# -- the distiller ------------------------------------------------------------------------------
def test_loss_terms_by_epoch_kind():
    d = make()
    x, y = batch()
    assert set(d.forward_train(x, y, 0)[1]) == {"ce", "kd"}  # memory epoch
    fill(d, 2)
    assert set(d.forward_train(x, y, 2)[1]) == {"ce", "kd", "review"}


def test_review_loss_with_zero_forecast_is_mean_squared_target():
    d = make(params=dict(SHORT, at_norm="flat"))
    fill(d, 2)
    for f in d.forecasters:  # the last 1x1 conv -> all-zero forecast P
        torch.nn.init.zeros_(f.up[-1].weight)
        torch.nn.init.zeros_(f.up[-1].bias)
    x, _ = batch()
    s_taps, t_taps = d.student(x)[1]["feats"], d.teacher_forward(x)[1]["preact_feats"]
    got = d.review_loss(x, s_taps, t_taps)
    want = sum(((attention_map(s_taps[i], "flat") - attention_map(t_taps[i], "flat")) ** 2).mean() for i in range(3))
    torch.testing.assert_close(got, want)


def test_teacher_is_pooled_to_student_size():
    d = make("MobileNetV2", "resnet8")  # student taps 16, 16, 8 px; teacher 32, 32, 16 px
    fill(d, 2)
    x, y = batch()
    assert torch.isfinite(d.forward_train(x, y, 2)[1]["review"])


def test_snapshots_stay_put_while_the_student_trains():
    d = make()
    x, y = batch()
    d.on_epoch_end(0)
    snap = {k: v.clone() for k, v in d.memory.slot(0).items()}
    student_before = {k: v.clone() for k, v in d.student.state_dict().items()}
    step(d, 1, x, y)
    assert any(not torch.equal(v, d.student.state_dict()[k]) for k, v in student_before.items())
    d.on_epoch_end(1)
    d.on_epoch_start(2)
    step(d, 2, x, y)  # a review step runs the snapshots (BatchNorm in train mode)
    slot0 = d.memory.snapshots()[0]
    assert all(torch.equal(slot0[k], v) for k, v in snap.items())
    assert d.memory.epochs == (0, 1)


def test_gradients_by_epoch_kind():
    d = make()
    x, y = batch()
    _, losses = d.forward_train(x, y, 0)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.forecasters.parameters())
    assert all(p.grad is not None for p in d.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    fill(d, 2)
    d.zero_grad(set_to_none=True)
    _, losses = d.forward_train(x, y, 2)
    losses["review"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.forecasters.parameters())
    assert d.student.conv1.weight.grad.abs().sum() > 0  # the review loss reaches the student
    assert all(p.grad is None for p in d.teacher.parameters())
    trainable = {id(p) for p in d.trainable_parameters()}
    assert {id(p) for p in d.forecasters.parameters()} <= trainable
    assert not {id(p) for p in d.teacher.parameters()} & trainable


def test_detach_target_stops_the_gradient_through_the_target():
    x, y = batch()
    grads = {}
    for detach in (False, True):
        d = make(params=dict(SHORT, detach_target=detach, detach_increment=detach))
        fill(d, 2)
        d.forward_train(x, y, 2)[1]["review"].backward()
        grads[detach] = d.student.conv1.weight.grad
    assert grads[True] is None and grads[False].abs().sum() > 0


def test_recomputed_forecasters_give_the_same_loss_and_gradients_bit_for_bit():
    """recompute_forecasters only changes what is kept for the backward (the activations are
    computed again there): every number of the step is the same, whichever branches recompute."""
    x, y = batch()
    out = {}
    for recompute in (False, True, "all"):
        d = make(params=dict(SHORT, recompute_forecasters=bool(recompute)))
        assert d._recomputed == {False: frozenset(), True: {0}, "all": {0}}[recompute]  # the rule, below
        if recompute == "all":
            d._recomputed = frozenset(range(len(d.forecasters)))
        fill(d, 2)
        loss = sum(d.forward_train(x, y, 2)[1].values())
        loss.backward()
        out[recompute] = loss.detach(), {n: p.grad for n, p in d.named_parameters() if p.grad is not None}
    loss0, g0 = out[False]
    assert any(n.startswith("forecasters") for n in g0)
    for loss1, g1 in (out[True], out["all"]):
        assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
        assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_recomputed_branches_run_up_to_the_largest():
    """The branches from the first to the one holding the most activations (hidden x area): the
    first alone with the presets' taps, largest map first; all of them when the largest is last."""
    assert recomputed_branches((64, 64, 32), [(32, 32), (32, 32), (16, 16)]) == {0}  # ResNet / WRN
    assert recomputed_branches((64, 32, 32), [(32, 32), (16, 16), (8, 8)]) == {0}  # VGG-8
    assert recomputed_branches((32, 64, 64), [(16, 16), (32, 32), (32, 32)]) == {0, 1}  # taps (2, 0, 1)
    assert recomputed_branches((32, 32, 64), [(8, 8), (16, 16), (32, 32)]) == {0, 1, 2}


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_review_step_on_every_pair(teacher, student):
    d = make(student, teacher)
    assert d._prefix.truncated
    fill(d, 2)
    x, y = batch(3)
    losses = step(d, 2, x, y)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["review"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.forecasters.parameters())


@pytest.mark.parametrize("taps, want", [("authors", "feats"), ("preact", "preact_feats"), ("post", "feats")])
def test_vgg_teacher_taps_follow_the_authors_code(taps, want):
    """The authors' vgg.py ignores its preact flag: their VGG teachers give post-activation maps."""
    d = make("vgg8", "vgg13", params=dict(SHORT, teacher_taps=taps))
    fill(d, 2)
    x, y = batch()
    s_feats, t_taps = d.student(x)[1]["feats"], d.teacher_forward(x)[1]
    assert not torch.equal(t_taps["feats"][1], t_taps["preact_feats"][1])  # BN output vs its ReLU
    torch.testing.assert_close(d.forward_train(x, y, 2)[1]["review"], d.review_loss(x, s_feats, t_taps[want]),
                               rtol=0, atol=0)
    assert make(params=SHORT)._teacher_taps == "preact_feats"  # ResNet teachers: pre-activation, as theirs


def test_unmatched_taps_name_the_pair():
    with pytest.raises(ValueError, match="CifarResNet -> CifarResNet.*taps"):
        make(params=dict(SHORT, taps=[0, 1, 2, 6]))


def test_review_needs_the_snapshots_of_its_own_cycle():
    d = make()
    with pytest.raises(RuntimeError, match="epochs \\(0, 1\\)"):
        d.on_epoch_start(2)
    d.on_epoch_end(0)
    d.on_epoch_end(1)
    d.on_epoch_start(2)
    with pytest.raises(RuntimeError, match="epochs \\(3, 4\\)"):
        d.on_epoch_start(5)


def test_exported_student_has_only_student_keys():
    d = make("resnet8x4", "resnet32x4")
    assert d.student.state_dict().keys() == create_model("resnet8x4").state_dict().keys()
    keys = d.state_dict().keys()
    assert any(k.startswith("forecasters.") for k in keys) and "memory._extra_state" in keys
    assert not any("forecasters" in k or "memory" in k for k in d.student.state_dict())


def test_state_dict_round_trip_restores_memory_exactly():
    d = make()
    x, y = batch()
    d.on_epoch_end(0)
    step(d, 1, x, y)
    d.on_epoch_end(1)
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)  # as the trainer's checkpoint does
    buf.seek(0)
    e = make(seed=1)
    e.teacher.load_state_dict(d.teacher.state_dict())  # the teacher comes from its own file, not the checkpoint
    e.load_state_dict(torch.load(buf, map_location="cpu", weights_only=False))
    assert e.memory.epochs == d.memory.epochs == (0, 1)
    for a, b in zip(d.memory.snapshots(), e.memory.snapshots(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    d.on_epoch_start(2)
    e.on_epoch_start(2)
    torch.testing.assert_close(d.forward_train(x, y, 2)[1]["review"], e.forward_train(x, y, 2)[1]["review"],
                               rtol=0, atol=0)


def test_memory_follows_dtype_moves():
    d = make()
    d.on_epoch_end(0)
    d.memory.to(torch.float64)
    assert d.memory.slot(0)["conv1.weight"].dtype == torch.float64
    assert d.memory.slot(0)["bn1.num_batches_tracked"].dtype == torch.int64


# -- end to end through the trainer -------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["decay", "frozen"])
def test_forecasters_between_reviews_follow_sgd_by_hand(make_spec, mode):
    """After a review, the general steps of the next epoch: with 'decay' (the authors' torch 1.9
    zero_grad, which zero-fills gradients) SGD applies weight decay and Nesterov momentum to the
    forecasters at every step, as written out by hand here; with 'frozen' they do not move."""
    from tskd.engine.checkpoint import load_latest_checkpoint
    from tskd.engine.trainer import train

    class Forecasters(Observer):
        """At the end of epoch 4 (a memory node): the forecasters' weights and momentum buffers as the
        checkpoint of epoch 3 (the review) holds them, and their weights now."""

        name = "forecasters"

        def on_epoch_end(self, run, epoch, row):
            if epoch != 3:
                return
            state = load_latest_checkpoint(run.out / "checkpoint.pt")
            assert state["epoch"] == 3
            d = run.distiller
            trainable = list(d.trainable_parameters())
            index = [next(i for i, q in enumerate(trainable) if q is p) for p in d.forecasters.parameters()]
            self.bufs = [state["optimizer"]["state"][i]["momentum_buffer"] for i in index]
            self.before = [state["distiller"][f"forecasters.{n}"] for n, _ in d.forecasters.named_parameters()]
            self.after = [p.detach().clone() for p in d.forecasters.parameters()]
            self.steps = run.data.epoch_steps(run.spec.recipe.batch_size)

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    spec = make_spec(out="student", method="tskd", teacher_arch="resnet8", teacher_path=f"{teacher.out_dir}/model.pt",
                     method_params={"delta": 1, "k": 2, "forecaster_between_reviews": mode},
                     recipe={"epochs": 4, "milestones": [], "lr": 0.1, "nesterov": True, "weight_decay": 5e-4})
    seen = Forecasters()
    train(spec, observers=[seen])  # memory, memory, review, then a memory node: no review loss, no gradient
    before, bufs, forecasters, steps = seen.before, seen.bufs, seen.after, seen.steps
    assert before
    r = spec.recipe
    for w0, buf, p in zip(before, bufs, forecasters, strict=True):
        if mode == "frozen":
            assert torch.equal(p, w0)
            continue
        w = w0
        for _ in range(steps):
            d_p = r.weight_decay * w  # the gradient is zero: weight decay alone
            buf = r.momentum * buf + d_p
            w = w - r.lr * (d_p + r.momentum * buf)  # Nesterov
        torch.testing.assert_close(p, w, rtol=1e-5, atol=1e-7)
        assert not torch.equal(p, w0)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_cxx)], ids=["eager", "compiled"])
def test_trainer_resumes_exactly_across_a_review_epoch(make_spec, compiled):
    from tskd.engine import trainer as trainer_mod

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    trainer_mod.train(teacher)
    tpath = f"{teacher.out_dir}/model.pt"

    def spec(out):
        return make_spec(out=out, method="tskd", arch="resnet8", teacher_arch="resnet8", teacher_path=tpath,
                         method_params={"delta": 1, "k": 2, "compile": compiled},
                         recipe={"epochs": 4, "milestones": []})

    whole = trainer_mod.train(spec("whole"))
    # every row has every column (DVC's plots need it): None where the epoch has no review loss
    assert whole["history"][2]["train_review"] is not None and whole["history"][1]["train_review"] is None
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(spec("resumed"), observers=[KillAt(2)])
    resumed = trainer_mod.train(spec("resumed"))
    assert _strip(resumed) == _strip(whole)
    exported = torch.load(f"{spec('whole').out_dir}/model.pt", weights_only=True)["model"]
    assert exported.keys() == create_model("resnet8").state_dict().keys()


def _strip(m):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in m["history"]]


@pytest.mark.slow
def test_resume_between_reviews_keeps_the_forecasters_decaying(make_spec):
    """Killed after a review: the resumed run's forecasters go on decaying (their zeroed gradients
    are restored), so the next review starts from the same weights as in the uninterrupted run."""
    from tskd.engine import trainer as trainer_mod

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    trainer_mod.train(teacher)

    def spec(out):  # memory 0, 1 | review 2 | memory 3, 4 | review 5
        return make_spec(out=out, method="tskd", teacher_arch="resnet8", teacher_path=f"{teacher.out_dir}/model.pt",
                         method_params={"delta": 1, "k": 2}, recipe={"epochs": 6, "milestones": [], "lr": 0.1})

    whole = trainer_mod.train(spec("whole"))
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(spec("resumed"), observers=[KillAt(3)])
    resumed = trainer_mod.train(spec("resumed"))
    assert _strip(resumed) == _strip(whole)
