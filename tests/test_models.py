"""CIFAR model zoo: forward/taps contract, CRD/mdistiller state-dict compatibility, checkpoint loading."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tskd.models import create_model, list_models, model_entry
from tskd.models.published import load_published_checkpoint
from tskd.models.summary import format_model_table, model_table
from tskd.models.taps import probe_taps

SPEC_NAME = "cifar_zoo_state_dicts.json"
REPO_ROOT = Path(__file__).resolve().parents[1]
CIFAR = list_models("cifar")
SMALL = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
# Families whose stage taps are taken right before a ReLU, so relu(preact) == feat beyond the stem.
# (WRN is pre-activation: its preact is the BN the next stage applies to the feat.)
RELU_OF_PREACT = [n for n in CIFAR if not n.startswith("wrn") and n != "MobileNetV2"]


def _spec_path() -> Path:
    env = os.environ.get("TSKD_SHARED_DOCS")
    if env:
        p = Path(env)
        return p if p.suffix == ".json" else p / SPEC_NAME
    return REPO_ROOT.parent / "shared" / "docs" / SPEC_NAME


@pytest.fixture(scope="module")
def spec() -> dict:
    path = _spec_path()
    if not path.is_file():
        pytest.skip(f"state-dict spec {path} not found (set TSKD_SHARED_DOCS to the docs folder)")
    return json.loads(path.read_text())["models"]


@functools.cache
def _model(name: str) -> nn.Module:
    """One shared eval-mode instance per architecture (building them is most of the test time)."""
    return create_model(name, num_classes=100).eval()


@functools.cache
def _run(name: str) -> tuple[torch.Tensor, dict]:
    """One eval forward of a (2, 3, 32, 32) batch per architecture, shared by the tap tests."""
    torch.manual_seed(0)
    with torch.no_grad():
        return _model(name)(torch.randn(2, 3, 32, 32))


def _shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", CIFAR)
def test_forward_taps(name):
    logits, taps = _run(name)
    assert logits.shape == (2, 100)
    feats, preacts = taps["feats"], taps["preact_feats"]
    assert len(feats) == len(preacts) >= 4
    assert [f.shape for f in feats] == [p.shape for p in preacts]
    assert taps["pooled_feat"].shape == (2, _classifier_in_features(_model(name)))
    sizes = [f.shape[-1] for f in feats]
    assert sizes == sorted(sizes, reverse=True)  # earliest tap first, last stage output last
    assert preacts[0] is feats[0]  # stem entry: the same tensor, as in mdistiller


def _classifier_in_features(model: nn.Module) -> int:
    """Input width of the model's only linear layer (the classifier)."""
    (linear,) = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linear.in_features


@pytest.mark.parametrize("name", RELU_OF_PREACT)
def test_preact_is_feat_before_relu(name):
    _, taps = _run(name)
    for feat, pre in zip(taps["feats"][1:], taps["preact_feats"][1:], strict=True):
        assert torch.equal(F.relu(pre), feat)
        assert (pre < 0).any()  # really a pre-activation, not the feat itself


def test_tap_shapes_per_family():
    expect = {
        "resnet8x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)],
        "wrn_16_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)],
        "vgg8": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)],
        "MobileNetV2": [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
        "ShuffleV1": [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)],
        "ShuffleV2": [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)],
        "ResNet50": [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)],
    }
    for name, shapes in expect.items():
        assert [tuple(f.shape[1:]) for f in _run(name)[1]["feats"]] == shapes, name
    probed = probe_taps(_model("resnet8x4"), (32, 32))  # the shapes consumers read through taps.py
    assert probed.feats == probed.preact_feats == expect["resnet8x4"]
    assert (probed.pooled, probed.num_classes) == (256, 100)


def test_registry_matches_spec(spec):
    assert sorted(spec) == CIFAR
    assert {n for n in CIFAR if model_entry(n).small} == SMALL


@pytest.mark.parametrize("name", CIFAR)
def test_state_dict_matches_spec(name, spec):
    assert _shapes(_model(name)) == spec[name]["state_dict"]
    assert sum(p.numel() for p in _model(name).parameters()) == spec[name]["params"]


@pytest.mark.parametrize(
    "name, millions",
    [("resnet8x4", 1.23), ("resnet32x4", 7.43), ("resnet20", 0.28), ("resnet56", 0.86), ("resnet110", 1.74)],
)
def test_param_counts_quoted_in_method(name, millions):
    assert sum(p.numel() for p in _model(name).parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


@pytest.mark.parametrize("name", ["wrn_16_1", "resnet8", "vgg8", "ShuffleV2"])
def test_one_train_step_updates_each_batchnorm_once(name):
    # mdistiller's WRN re-applies stage BNs to build its preact taps, updating running stats twice.
    model = create_model(name)
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert {int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1}


def test_num_classes_keyword():
    logits, _ = create_model("ShuffleV1", num_classes=10).eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 10)


# --- published checkpoints ---------------------------------------------------------------


def _random_state(name: str) -> dict[str, torch.Tensor]:
    """A state_dict of ``name`` with every float tensor randomised (so a load is observable)."""
    sd = create_model(name).state_dict()
    return {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v + 7) for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 240, "accuracy": 79.42},  # CRD/mdistiller ckpt_epoch_240.pth
        lambda sd: {"model": sd, "epoch": 240, "accuracy": np.float64(79.42)},  # numpy scalar
        lambda sd: {"model": sd, "arch": "resnet8x4", "epoch": 240},  # our own export
        lambda sd: {"state_dict": sd},
        lambda sd: sd,
    ],
    ids=["crd", "crd-numpy", "export", "state_dict", "bare"],
)
def test_round_trip_strict(tmp_path, wrap):
    sd = _random_state("resnet8x4")
    path = tmp_path / "resnet8x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save(wrap(sd), path)
    model = load_published_checkpoint(path, "resnet8x4")
    loaded = model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_other_architecture_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": _random_state("resnet8x4"), "epoch": 240, "accuracy": 79.42}, path)
    with pytest.raises(ValueError) as err:
        load_published_checkpoint(path, "resnet32x4")
    msg = str(err.value)
    assert str(path) in msg and "'resnet32x4'" in msg
    assert "missing keys" in msg and "layer1.1." in msg
    assert "looks like a resnet8x4 checkpoint" in msg


def test_wrong_class_count_names_the_shapes(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": _random_state("wrn_16_2")}, path)
    with pytest.raises(ValueError, match=r"fc\.weight file \[100, 128\] vs model \[10, 128\]") as err:
        load_published_checkpoint(path, "wrn_16_2", num_classes=10)
    assert "looks like a wrn_16_2 checkpoint (100 classes)" in str(err.value)


def test_truncated_file_is_refused(tmp_path):
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"model": _random_state("resnet8"), "epoch": 240}, good)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated") as err:
        load_published_checkpoint(bad, "resnet8")
    assert str(bad) in str(err.value)


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match="does not exist") as err:
        load_published_checkpoint(path, "resnet8")
    assert str(path) in str(err.value)


# --- summary table -----------------------------------------------------------------------


def test_model_table(spec):
    rows = model_table("cifar")
    assert [r["name"] for r in rows] == CIFAR
    assert all(r["params"] == spec[r["name"]]["params"] and r["family"] == "cifar" for r in rows)
    assert {r["name"] for r in rows if r["small"]} == SMALL
    text = format_model_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "family", "params", "(M)", "small"]
    assert len(lines) == len(rows) + 2
    assert any(line.split()[:3] == ["resnet32x4", "cifar", "7.43"] for line in lines)
