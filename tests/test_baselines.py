"""The baseline distillers (AT, FitNet, DKD, ReviewKD, CRD): losses against hand-worked cases, gradient
flow, one training step for every CIFAR-100 pair, schedules, and CRD's memory bank."""

from __future__ import annotations

import copy
import functools
import math
import warnings

import pytest
import torch
from torch import nn

from tskd.distill import DistillContext, build_distiller, method_class, parse_method_params
from tskd.distill.losses import kd_loss
from tskd.distill.methods.at import at_loss, attention_map
from tskd.distill.methods.crd import nce_loss
from tskd.distill.methods.dkd import dkd_terms
from tskd.distill.methods.reviewkd import hcl_loss
from tskd.models import create_model

PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
         ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV1"),
         ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"), ("vgg13", "MobileNetV2"),
         ("ResNet50", "MobileNetV2")]
METHODS = ["at", "fitnet", "dkd", "reviewkd", "crd"]
NUM_TRAIN = 64
TRAIN_LABELS = torch.arange(NUM_TRAIN) % 5  # 5 classes of 13/13/13/13/12 samples


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def ctx(epochs: int = 240, num_train: int = NUM_TRAIN, train_labels=TRAIN_LABELS) -> DistillContext:
    return DistillContext(num_classes=100, image_size=(32, 32), epochs=epochs, num_train=num_train,
                          train_labels=train_labels)


@functools.cache
def teacher(name: str) -> nn.Module:
    torch.manual_seed(1)
    return create_model(name, num_classes=100)  # frozen by the distiller; shared between tests


def student(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=100)


def batch(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    indices = torch.randperm(NUM_TRAIN, generator=g)[:n]
    return images, TRAIN_LABELS[indices].clone(), indices


class FakeNet(nn.Module):
    """A 'network' whose taps are fixed tensors (one sample, expanded to the batch) times a scalar
    parameter, so a loss can be checked against numbers worked out by hand."""

    def __init__(self, feats, pooled, logits, preact=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.feats, self.pooled, self.logits = feats, pooled, logits
        self.preact = preact if preact is not None else feats

    def forward(self, x):
        b = x.shape[0]

        def grow(t):
            return t.expand(b, *t.shape[1:]) * self.scale

        return grow(self.logits), {"feats": [grow(f) for f in self.feats],
                                   "preact_feats": [grow(f) for f in self.preact], "pooled_feat": grow(self.pooled)}


def fake(shapes, pooled_dim=4, classes=3, seed=0, feats=None, pooled=None):
    g = torch.Generator().manual_seed(seed)
    feats = feats or [torch.randn(1, *s, generator=g) for s in shapes]
    pooled = pooled if pooled is not None else torch.randn(1, pooled_dim, generator=g)
    return FakeNet(feats, pooled, torch.randn(1, classes, generator=g))


# -- defaults are the published hyperparameters -------------------------------------------------------
def test_defaults_are_the_published_hyperparameters():
    at = parse_method_params("at", {})
    assert (at.p, at.ce_weight, at.feat_weight) == (2.0, 1.0, 1000.0)
    fn = parse_method_params("fitnet", {})
    assert (fn.hint_layer, fn.ce_weight, fn.feat_weight, fn.hint_epochs) == (2, 1.0, 100.0, 0)
    dkd = parse_method_params("dkd", {})
    assert (dkd.ce_weight, dkd.alpha, dkd.beta, dkd.T, dkd.warmup) == (1.0, 1.0, 8.0, 4.0, 20)
    rv = parse_method_params("reviewkd", {})
    assert (rv.ce_weight, rv.review_weight, rv.warmup, rv.max_mid_channels) == (1.0, 5.0, 20, 512)
    crd = parse_method_params("crd", {})
    assert (crd.ce_weight, crd.crd_weight, crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_momentum, crd.negatives) == \
        (1.0, 0.8, 128, 16384, 0.07, 0.5, "other_class")
    for name in METHODS:
        for field in method_class(name).Params.model_fields.values():
            assert field.description, f"{name}: every param is documented"


def test_unknown_param_is_refused():
    with pytest.raises(ValueError, match=r"methods\.dkd\.gamma"):
        parse_method_params("dkd", {"gamma": 1.0})


# -- AT ---------------------------------------------------------------------------------------------------
def test_attention_map_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    # mean over channels of x^2: (1+1)/2, (4+0)/2, (9+0)/2, (16+4)/2
    raw = [1.0, 2.0, 4.5, 10.0]
    norm = math.sqrt(sum(v * v for v in raw))
    assert attention_map(x, 2.0)[0].tolist() == pytest.approx([v / norm for v in raw])


def test_at_loss_pools_the_larger_feature_map_by_hand():
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 2.0]]]])
    # teacher 4x4 whose 2x2 block means are [[1, 2], [2, 1]]; squaring before pooling would give 2 for the
    # first block, so this also checks that the feature (not the map) is pooled
    f_t = torch.tensor([[[[0.0, 2.0, 2.0, 2.0], [2.0, 0.0, 2.0, 2.0],
                          [1.0, 3.0, 4.0, 0.0], [1.0, 3.0, 0.0, 0.0]]]])
    a_s = [v / math.sqrt(125.25) for v in (1.0, 2.0, 4.5, 10.0)]
    a_t = [v / math.sqrt(34.0) for v in (1.0, 4.0, 4.0, 1.0)]
    expected = sum((s - t) ** 2 for s, t in zip(a_s, a_t, strict=True)) / 4
    assert at_loss(f_s, f_t, 2.0).item() == pytest.approx(expected)
    assert at_loss(f_t, f_s, 2.0).item() == pytest.approx(expected)

    # through the distiller: stem ignored, weight 1000, summed over stages
    s = fake(None, feats=[torch.randn(1, 3, 2, 2), f_s, f_s])
    t = fake(None, feats=[torch.randn(1, 5, 4, 4), f_t, f_s])
    d = build_distiller("at", s, t, {}, ctx())
    _, losses = d.forward_train(torch.zeros(1, 3, 32, 32), torch.tensor([0]), epoch=0)
    assert losses["at"].item() == pytest.approx(1000 * expected)


# -- FitNet -----------------------------------------------------------------------------------------------
def test_fitnet_hint_loss_with_identity_regressor_by_hand():
    s_hint = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[0.5, 3.0], [-2.0, 1.0]]]])
    t_hint = torch.tensor([[[[0.5, 0.0], [1.0, 1.0]], [[0.0, 2.0], [1.0, -1.0]]]])
    s = fake(None, feats=[torch.randn(1, 3, 4, 4), s_hint])
    t = fake(None, feats=[torch.randn(1, 3, 4, 4), t_hint])
    d = build_distiller("fitnet", s, t, {"hint_layer": 1}, ctx())
    reg = d.regressor
    assert isinstance(reg.conv, nn.Conv2d) and reg.conv.kernel_size == (1, 1)
    with torch.no_grad():
        reg.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        reg.conv.bias.zero_()
    d.eval()  # BN with its initial running stats: x / sqrt(1 + eps)
    _, losses = d.forward_train(torch.zeros(1, 3, 32, 32), torch.tensor([0]), epoch=0)
    scale = 1 / math.sqrt(1 + 1e-5)
    sq = [(max(a * scale, 0.0) - b) ** 2 for a, b in zip(s_hint.flatten().tolist(), t_hint.flatten().tolist(),
                                                          strict=True)]
    assert losses["hint"].item() == pytest.approx(100 * sum(sq) / len(sq))


@pytest.mark.parametrize(("s_size", "t_size", "kind"), [(8, 4, nn.Conv2d), (4, 8, nn.ConvTranspose2d),
                                                        (6, 4, nn.Conv2d)])
def test_fitnet_regressor_matches_spatial_sizes(s_size, t_size, kind):
    s = fake([(3, 16, 16), (5, s_size, s_size)])
    t = fake([(3, 16, 16), (7, t_size, t_size)])
    d = build_distiller("fitnet", s, t, {"hint_layer": 1}, ctx())
    assert isinstance(d.regressor.conv, kind)
    out = d.regressor(torch.randn(2, 5, s_size, s_size))
    assert out.shape == (2, 7, t_size, t_size)


def test_fitnet_refuses_unmatched_taps_and_bad_hint_layer():
    with pytest.raises(ValueError, match="fitnet.*3x3.*8x8"):
        build_distiller("fitnet", fake([(3, 8, 8), (4, 3, 3)]), fake([(3, 8, 8), (4, 8, 8)]), {"hint_layer": 1},
                        ctx())
    with pytest.raises(ValueError, match="hint_layer=5"):
        build_distiller("fitnet", student("resnet20"), teacher("resnet56"), {"hint_layer": 5}, ctx())


def test_fitnet_hint_stage_returns_only_the_hint_loss():
    d = build_distiller("fitnet", student("ShuffleV1"), teacher("resnet32x4"), {"hint_epochs": 2}, ctx(epochs=10))
    assert isinstance(d.regressor.conv, nn.ConvTranspose2d)  # 8x8 student tap -> 16x16 teacher tap
    d.train()
    images, labels, _ = batch()
    _, losses = d.forward_train(images, labels, epoch=1)
    assert set(losses) == {"hint"}
    sum(losses.values()).backward()
    classifier = [m for m in d.student.modules() if isinstance(m, nn.Linear)][-1]
    assert classifier.weight.grad is None  # past the hint layer: untouched in stage 1
    assert all(p.grad is not None for p in d.regressor.parameters())
    assert next(d.student.parameters()).grad.abs().sum() > 0  # the stem learns
    _, losses = d.forward_train(images, labels, epoch=2)
    assert set(losses) == {"ce", "hint"}


def test_fitnet_check_schedule_names_hint_epochs():
    cls = method_class("fitnet")
    with pytest.raises(ValueError, match="hint_epochs"):
        cls.check_schedule(parse_method_params("fitnet", {"hint_epochs": 10}), epochs=10)
    cls.check_schedule(parse_method_params("fitnet", {"hint_epochs": 9}), epochs=10)
    cls.check_schedule(parse_method_params("fitnet", {}), epochs=1)  # default 0 never refuses
    for name in ("at", "dkd", "reviewkd", "crd"):  # warm-ups longer than a smoke run are allowed
        method_class(name).check_schedule(parse_method_params(name, {}), epochs=2)


# -- DKD --------------------------------------------------------------------------------------------------
def _softmax(zs, T):
    e = [math.exp(z / T) for z in zs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_dkd_terms_on_three_classes_by_hand():
    z_s = [[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]]
    z_t = [[3.0, 1.0, 0.0], [2.0, 0.0, 1.0]]
    labels = [0, 2]
    T = 2.0
    tckd = nckd = 0.0
    for zs, zt, y in zip(z_s, z_t, labels, strict=True):
        ps, pt = _softmax(zs, T), _softmax(zt, T)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]) * T * T / 2
        others = [c for c in range(3) if c != y]
        qs, qt = _softmax([zs[c] for c in others], T), _softmax([zt[c] for c in others], T)
        nckd += _kl(qt, qs) * T * T / 2
    got = dkd_terms(torch.tensor(z_s), torch.tensor(z_t), torch.tensor(labels), T)
    assert got[0].item() == pytest.approx(tckd, rel=1e-5)
    assert got[1].item() == pytest.approx(nckd, rel=1e-5)

    # the decomposition DKD rests on: KD = TCKD + (1 - p_t[target]) * NCKD, sample by sample
    zs, zt = torch.tensor(z_s[:1]), torch.tensor(z_t[:1])
    t1, n1 = dkd_terms(zs, zt, torch.tensor([0]), T)
    p_t = _softmax(z_t[0], T)[0]
    assert kd_loss(zs, zt, T).item() == pytest.approx((t1 + (1 - p_t) * n1).item(), rel=1e-5)


def test_dkd_warmup_scales_the_loss():
    d = build_distiller("dkd", student("resnet20"), teacher("resnet56"), {}, ctx())
    d.eval()  # same logits on every call
    images, labels, _ = batch()
    at = {e: d.forward_train(images, labels, epoch=e)[1] for e in (0, 9, 19, 100)}
    for term in ("tckd", "nckd"):
        full = at[100][term].item()
        assert full > 0
        assert at[19][term].item() == pytest.approx(full)
        assert at[0][term].item() == pytest.approx(full / 20)
        assert at[9][term].item() == pytest.approx(full / 2)
    assert at[0]["ce"].item() == pytest.approx(at[100]["ce"].item())
    d0 = build_distiller("dkd", student("resnet20"), teacher("resnet56"), {"warmup": 0, "beta": 2.0}, ctx())
    d0.eval()
    _, losses = d0.forward_train(images, labels, epoch=0)
    assert losses["nckd"].item() == pytest.approx(at[100]["nckd"].item() / 8 * 2, rel=1e-5)


# -- ReviewKD ---------------------------------------------------------------------------------------------
def test_hcl_loss_on_a_tiny_pyramid_by_hand():
    f4 = torch.arange(16.0).view(1, 1, 4, 4)
    f2 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    f1 = torch.tensor([[[[3.0]]]])
    t4, t2, t1 = torch.zeros_like(f4), torch.zeros_like(f2), torch.ones_like(f1)
    # 4x4: full MSE mean(i^2, i<16) = 77.5; 2x2 block means 2.5, 4.5, 10.5, 12.5 -> 73.25 (weight 1/2);
    # 1x1 mean 7.5 -> 56.25 (weight 1/4); 4x4 pooling skipped (not smaller than the map)
    l4 = (77.5 + 0.5 * 73.25 + 0.25 * 56.25) / 1.75
    # 2x2: full MSE 7.5; 1x1 mean 2.5 -> 6.25 (weight 1/2)
    l2 = (7.5 + 0.5 * 6.25) / 1.5
    l1 = (3.0 - 1.0) ** 2  # 1x1: the full MSE only
    assert hcl_loss([f4, f2, f1], [t4, t2, t1]).item() == pytest.approx(l4 + l2 + l1)


@pytest.mark.parametrize(("t_name", "s_name"), [("resnet32x4", "ShuffleV2"), ("ResNet50", "MobileNetV2"),
                                                ("vgg13", "vgg8")])
def test_reviewkd_abfs_sized_from_taps(t_name, s_name):
    s, t = student(s_name), teacher(t_name)
    d = build_distiller("reviewkd", s, t, {}, ctx())
    _, s_taps = s(torch.zeros(2, 3, 32, 32))
    _, t_taps = t(torch.zeros(2, 3, 32, 32))
    s_levels = [*s_taps["feats"][1:], s_taps["pooled_feat"][:, :, None, None]][::-1]
    t_levels = [*t_taps["preact_feats"][1:], t_taps["pooled_feat"][:, :, None, None]][::-1]
    assert len(d.abfs) == len(s_levels) == len(t_levels)
    mid = min(512, s_taps["pooled_feat"].shape[1])
    residual = None
    for k, (abf, x, ft) in enumerate(zip(d.abfs, s_levels, t_levels, strict=True)):
        assert (abf.attention is None) == (k == 0)
        out, residual = abf(x, residual, ft.shape[-2:])
        assert out.shape == ft.shape and residual.shape[1] == mid


def test_reviewkd_refuses_unpaired_levels_and_warms_up():
    with pytest.raises(ValueError, match="reviewkd"):
        build_distiller("reviewkd", fake([(3, 8, 8), (4, 4, 4)]), fake([(3, 8, 8), (4, 4, 4), (6, 2, 2)]), {}, ctx())
    d = build_distiller("reviewkd", student("resnet20"), teacher("resnet56"), {"review_weight": 1.0}, ctx())
    d.eval()
    images, labels, _ = batch()
    r0 = d.forward_train(images, labels, epoch=0)[1]["review"].item()
    r1 = d.forward_train(images, labels, epoch=50)[1]["review"].item()
    assert r1 > 0 and r0 == pytest.approx(r1 / 20)


# -- CRD --------------------------------------------------------------------------------------------------
def test_nce_loss_by_hand():
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.05, 0.3, 0.01]])
    m_pn = 2 / 10  # K = 2 negatives, Pn = 1/10
    eps = 1e-7
    total = 0.0
    for row in scores.tolist():
        total += math.log(row[0] / (row[0] + m_pn + eps))
        total += sum(math.log(m_pn / (v + m_pn + eps)) for v in row[1:])
    assert nce_loss(scores, 10).item() == pytest.approx(-total / 2, rel=1e-6)


def test_crd_contrast_memory_on_a_tiny_bank_by_hand():
    s = fake(None, feats=[torch.randn(1, 2, 4, 4)], pooled=torch.tensor([[3.0, 4.0]]))
    t = fake(None, feats=[torch.randn(1, 2, 4, 4)], pooled=torch.tensor([[1.0, 0.0]]))
    labels = torch.tensor([0, 0, 1, 1])
    T = 0.5
    d = build_distiller("crd", s, t, {"feat_dim": 2, "nce_k": 2, "nce_t": T},
                        ctx(num_train=4, train_labels=labels))
    with torch.no_grad():
        for e in (d.embed_s, d.embed_t):
            e.linear.weight.copy_(torch.eye(2))
            e.linear.bias.zero_()
        d.memory_s.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
        d.memory_t.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-0.6, 0.8], [0.8, -0.6]]))
    idx = d.sample_indices(torch.tensor([0]))
    assert idx[0, 0].item() == 0 and sorted(idx[0, 1:].tolist()) == [2, 3]  # the other class, no repeats

    _, losses = d.forward_train(torch.zeros(1, 3, 32, 32), torch.tensor([0]), epoch=0, indices=torch.tensor([0]))
    v_s, v_t = (0.6, 0.8), (1.0, 0.0)  # the pooled features, L2-normalised by the identity embeddings
    # student embedding against teacher-bank rows 0 (positive), 2 and 3: dot products 0.8, 0.28, 0
    out_s = [math.exp(0.8 / T), math.exp(0.28 / T), math.exp(0.0 / T)]
    # teacher embedding against student-bank rows 0, 2, 3: dot products 1, 0.6, -1
    out_t = [math.exp(1.0 / T), math.exp(0.6 / T), math.exp(-1.0 / T)]

    def nce(out):  # Z = mean score x bank size (fixed from the first batch); K = 2, Pn = 1/4
        z = sum(out) / 3 * 4
        p = [o / z for o in out]
        m_pn, eps = 2 / 4, 1e-7
        return -(math.log(p[0] / (p[0] + m_pn + eps)) + sum(math.log(m_pn / (q + m_pn + eps)) for q in p[1:]))

    assert losses["crd"].item() == pytest.approx(0.8 * (nce(out_s) + nce(out_t)), rel=1e-5)
    assert d.z_norm.tolist() == pytest.approx([sum(out_s) / 3 * 4, sum(out_t) / 3 * 4], rel=1e-5)
    # momentum 0.5 then renormalise: only row 0 moves
    ms = (0.5 * 1.0 + 0.5 * v_s[0], 0.5 * 0.0 + 0.5 * v_s[1])
    mt = (0.5 * 0.0 + 0.5 * v_t[0], 0.5 * 1.0 + 0.5 * v_t[1])
    assert d.memory_s[0].tolist() == pytest.approx([c / math.hypot(*ms) for c in ms], rel=1e-5)
    assert d.memory_t[0].tolist() == pytest.approx([c / math.hypot(*mt) for c in mt], rel=1e-5)
    assert torch.allclose(d.memory_s[1:], torch.tensor([[0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]]))
    z = d.z_norm.clone()
    d.forward_train(torch.zeros(1, 3, 32, 32), torch.tensor([1]), epoch=0, indices=torch.tensor([1]))
    assert torch.equal(d.z_norm, z)  # Z is set once


def test_crd_negative_sampling_caps_and_modes():
    d = build_distiller("crd", student("resnet20"), teacher("resnet56"), {}, ctx())
    assert d.num_k == NUM_TRAIN - 1  # 16384 capped on a 64-sample set
    idx = d.sample_indices(torch.tensor([0, 7]))
    assert idx.shape == (2, NUM_TRAIN)
    assert idx[:, 0].tolist() == [0, 7]
    assert (TRAIN_LABELS[idx[:, 1:]] != TRAIN_LABELS[idx[:, :1]]).all()  # other classes only
    u = build_distiller("crd", student("resnet20"), teacher("resnet56"), {"negatives": "uniform", "nce_k": 10},
                        ctx(train_labels=None))
    assert u.sample_indices(torch.tensor([3])).shape == (1, 11)
    with pytest.raises(ValueError, match="train_labels"):
        build_distiller("crd", student("resnet20"), teacher("resnet56"), {}, ctx(train_labels=None))


def test_crd_memory_bank_is_a_buffer_and_round_trips():
    d = build_distiller("crd", student("resnet20"), teacher("resnet56"), {}, ctx())
    sd_keys = set(d.state_dict())
    assert {"memory_s", "memory_t", "z_norm"} <= sd_keys and "train_labels" not in sd_keys
    assert d.memory_s.shape == d.memory_t.shape == (NUM_TRAIN, 128)
    assert not any(p is d.memory_s for p in d.trainable_parameters())
    before = {k: v.clone() for k, v in d.state_dict().items() if k in ("memory_s", "memory_t", "z_norm")}
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.01)
    d.train()
    images, labels, indices = batch()
    loss = sum(d.forward_train(images, labels, epoch=0, indices=indices)[1].values())
    loss.backward()
    opt.step()
    others = torch.ones(NUM_TRAIN, dtype=torch.bool)
    others[indices] = False
    for k in ("memory_s", "memory_t"):
        assert not torch.allclose(d.state_dict()[k][indices], before[k][indices])
        assert torch.equal(d.state_dict()[k][others], before[k][others])
    assert (d.z_norm > 0).all() and (before["z_norm"] < 0).all()

    saved = copy.deepcopy(d.state_dict())
    d2 = build_distiller("crd", student("resnet20", seed=7), teacher("resnet56"), {}, ctx())
    d2.load_state_dict(saved)
    for k, v in d2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    d2.train()
    images, labels, indices = batch(seed=1)
    torch.manual_seed(5)
    a = d.forward_train(images, labels, epoch=1, indices=indices)[1]
    torch.manual_seed(5)
    b = d2.forward_train(images, labels, epoch=1, indices=indices)[1]
    assert {k: v.item() for k, v in a.items()} == {k: v.item() for k, v in b.items()}
    assert torch.equal(d.memory_s, d2.memory_s)


# -- every method, every pair: one training step ----------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("t_name", "s_name"), PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
def test_one_training_step(method, t_name, s_name):
    s, t = student(s_name), teacher(t_name)
    t_before = {k: v.clone() for k, v in t.state_dict().items()}
    d = build_distiller(method, s, t, {}, ctx())
    own = [p for n, p in d.named_parameters() if not n.startswith("student.")]
    assert len(list(d.trainable_parameters())) == len(list(s.parameters())) + len(own)
    d.train()
    assert not t.training
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.01, momentum=0.9)
    images, labels, indices = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a broadcasting MSE between mismatched shapes
        logits, losses = d.forward_train(images, labels, epoch=30, indices=indices)
    assert logits.shape == (2, 100)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() > 0
    opt.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is None for p in t.parameters())  # never the teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is not None for p in own), "every connector/embedding gets gradient"
    opt.step()
    t_after = t.state_dict()
    assert all(torch.equal(v, t_after[k]) for k, v in t_before.items())  # teacher BN stats too


def test_crd_other_class_negatives_with_replacement_need_no_batch_by_dataset_mask(monkeypatch):
    """mdistiller's ImageNet sampler (replace=True) at ImageNet's size: uniform over the other
    classes' samples, drawn by position in the class-sorted set (no (B x N) mask, no multinomial)."""
    n = 1_281_167
    labels = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    big = DistillContext(num_classes=1000, image_size=(32, 32), epochs=1, num_train=n, train_labels=labels)

    def no_mask(*args, **kwargs):
        raise AssertionError("sampled through a (batch x N) mask")

    monkeypatch.setattr(torch, "multinomial", no_mask)
    d = build_distiller("crd", student("resnet8"), teacher("resnet8"), {"replacement": "always"}, big)
    rows = torch.randint(0, n, (64,))
    idx = d.sample_indices(rows)
    assert idx.shape == (64, 1 + 16384) and torch.equal(idx[:, 0], rows)
    assert (labels[idx[:, 1:]] != labels[rows][:, None]).all() and idx.min() >= 0 and idx.max() < n

    small = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])  # uneven classes: each other sample equally likely
    ctx_small = DistillContext(num_classes=3, image_size=(32, 32), epochs=1, num_train=10, train_labels=small)
    d = build_distiller("crd", student("resnet8"), teacher("resnet8"), {"replacement": "always", "nce_k": 9},
                        ctx_small)
    torch.manual_seed(0)
    neg = d.sample_indices(torch.zeros(4000, dtype=torch.long))[:, 1:]  # rows of class 0
    counts = torch.bincount(neg.flatten(), minlength=10).float()
    assert counts[:2].sum() == 0  # never its own class
    assert (counts[2:] / counts[2:].mean() - 1).abs().max() < 0.05  # 36 000 draws over 8 samples


def test_at_pairs_stages_and_can_pair_them_as_mdistiller_does_for_r50_mv1():
    """Default: stage with stage (R50 layer i with MobileNetV1 stage i, the same size). mdistiller's
    R50 -> MV1 pairing (MV1 stages 2-4 with R50 layers 1-3, pooled) is a param."""
    from tskd.models import create_model

    ctx64 = DistillContext(num_classes=10, image_size=(64, 64), epochs=1, num_train=4)
    s, t = create_model("MobileNetV1", num_classes=10), create_model("resnet50", num_classes=10)
    aligned = build_distiller("at", s, t, {}, ctx64)
    assert aligned.pairs == [(1, 1), (2, 2), (3, 3), (4, 4)]
    theirs = build_distiller("at", s, t, {"student_taps": [2, 3, 4], "teacher_taps": [1, 2, 3]}, ctx64)
    x = torch.randn(2, 3, 64, 64)
    _, s_taps = s(x)
    _, t_taps = t(x)
    want = sum(at_loss(s_taps["feats"][i], t_taps["feats"][i - 1], 2.0) for i in (2, 3, 4))
    got = theirs.forward_train(x, torch.tensor([1, 2]), epoch=0)[1]["at"]
    torch.testing.assert_close(got, 1000.0 * want)
    with pytest.raises(ValueError, match="same length"):
        parse_method_params("at", {"student_taps": [2, 3], "teacher_taps": [1]})
