"""ImageNet models: torchvision's ResNets unmodified (state dicts, logits) with hooked taps, MobileNetV1."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tskd.distill import DistillContext, build_distiller
from tskd.models import create_model, model_entry
from tskd.models.published import ModelFileError, load_published_checkpoint
from tskd.models.taps import probe_taps

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

RESNETS = {"resnet18": (64, 64, 128, 256, 512), "resnet34": (64, 64, 128, 256, 512),
           "resnet50": (64, 256, 512, 1024, 2048)}


def _images(n=1, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(RESNETS))
def test_torchvision_weight_files_load_strictly_and_give_torchvisions_logits(name, tmp_path):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()  # torchvision's own, weights=None
    path = tmp_path / f"{name}-v1.pth"
    torch.save(reference.state_dict(), path)  # the layout of torchvision's IMAGENET1K_V1 files
    ours = load_published_checkpoint(path, name, num_classes=1000).eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = _images()
    with torch.no_grad():
        logits, taps = ours(x)
        want = reference(x)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)  # torchvision's forward, unchanged
    assert model_entry(name).family == "imagenet"


@pytest.mark.parametrize("name", list(RESNETS))
def test_resnet_taps_are_stem_and_layers_before_and_after_their_relu(name):
    torch.manual_seed(0)
    m = create_model(name).eval()
    x = _images()
    with torch.no_grad():
        _, taps = m(x)
        # The same tensors from torchvision's modules called one after another.
        stem = m.relu(m.bn1(m.conv1(x)))
        outs = [stem]
        y = m.maxpool(stem)
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            y = layer(y)
            outs.append(y)
    sizes = (112, 56, 28, 14, 7)
    assert [tuple(f.shape[1:]) for f in taps["feats"]] == [(c, s, s) for c, s in zip(RESNETS[name], sizes,
                                                                                      strict=True)]
    for post, pre, want in zip(taps["feats"], taps["preact_feats"], outs, strict=True):
        torch.testing.assert_close(post, want, rtol=0, atol=0)
        torch.testing.assert_close(torch.relu(pre), post, rtol=0, atol=0)
        assert (pre < 0).any()  # a real pre-activation: what the ReLU removed is still there
    assert taps["pooled_feat"].shape == (1, RESNETS[name][-1])


def test_taps_carry_gradients_and_a_deep_copy_records_its_own():
    m = create_model("resnet18")
    _, taps = m(_images(2, 64))
    taps["preact_feats"][2].sum().backward()
    assert m.layer2[-1].conv2.weight.grad.abs().sum() > 0
    assert not m._seen  # nothing of a batch is kept after the call
    twin = copy.deepcopy(m)
    _, a = twin(_images(2, 64, seed=1))
    _, b = m(_images(2, 64, seed=1))
    torch.testing.assert_close(a["feats"][3], b["feats"][3])
    assert twin._seen is not m._seen


def test_mobilenetv1_has_mdistillers_layout_and_taps():
    m = create_model("MobileNetV1").eval()
    keys = m.state_dict()
    assert "model.0.0.weight" in keys and "model.13.3.weight" in keys and keys["fc.weight"].shape == (1000, 1024)
    assert keys["model.1.0.weight"].shape == (32, 1, 3, 3)  # depthwise
    assert sum(p.numel() for p in m.parameters()) == 4_231_976
    with torch.no_grad():
        logits, taps = m(_images())
    assert logits.shape == (1, 1000)
    assert [tuple(f.shape[1:]) for f in taps["feats"]] == [(32, 112, 112), (128, 56, 56), (256, 28, 28),
                                                           (512, 14, 14), (1024, 7, 7)]
    for post, pre in zip(taps["feats"], taps["preact_feats"], strict=True):
        torch.testing.assert_close(torch.relu(pre), post, rtol=0, atol=0)
    assert model_entry("MobileNetV1").small


def test_a_file_of_another_imagenet_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelFileError) as e:
        load_published_checkpoint(path, "resnet34", num_classes=1000)
    assert str(path) in str(e.value) and "looks like a resnet18 checkpoint (1000 classes)" in str(e.value)
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ModelFileError, match=f"cannot read checkpoint {damaged}"):
        load_published_checkpoint(damaged, "resnet18", num_classes=1000)


@pytest.mark.parametrize("method", ["kd", "at", "fitnet", "dkd", "reviewkd", "crd", "tskd"])
@pytest.mark.parametrize(("t_name", "s_name"), [("resnet34", "resnet18"), ("resnet50", "MobileNetV1")])
def test_every_method_takes_a_step_on_the_imagenet_pairs(method, t_name, s_name):
    """At 64 px (the taps at 32, 16, 8, 4, 2): the pairs' tap shapes fit every method's connectors."""
    torch.manual_seed(0)
    s, t = create_model(s_name, num_classes=10), create_model(t_name, num_classes=10)
    ctx = DistillContext(num_classes=10, image_size=(64, 64), epochs=8, num_train=8,
                         train_labels=torch.arange(8) % 10)
    params = {"delta": 1, "k": 2} if method == "tskd" else {}
    d = build_distiller(method, s, t, params, ctx).train()
    if method == "tskd":  # fill the snapshots of the review at epoch 2
        d.on_epoch_end(0)
        d.on_epoch_end(1)
        d.on_epoch_start(2)
    x, y = _images(2, 64), torch.tensor([1, 2])
    _, losses = d.forward_train(x, y, epoch=2, indices=torch.tensor([0, 1]))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s.parameters())
    assert all(p.grad is None for p in t.parameters())
    assert probe_taps(s, (64, 64)).feats[0][1:] == (32, 32)


def test_imagenet_models_are_listed_with_imagenet_heads():
    from tskd.models.summary import model_table

    rows = {r["name"]: r for r in model_table("imagenet")}
    assert set(rows) == {"resnet18", "resnet34", "resnet50", "MobileNetV1"}
    assert rows["resnet50"]["params"] == 25_557_032  # torchvision's figure for ResNet-50
    assert isinstance(create_model("resnet18").fc, nn.Linear)


def test_torchvision_weights_resolve_to_torchs_hub_cache_and_their_hash_is_checked(tmp_path, monkeypatch):
    from tskd.data.integrity import sha256_file
    from tskd.models.published import check_torchvision_hash, resolve_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = resolve_checkpoint("resnet34", "torchvision:IMAGENET1K_V1")
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert resolve_checkpoint("resnet50", "torchvision:IMAGENET1K_V1").name == "resnet50-0676ba61.pth"  # V1, not V2
    with pytest.raises(ModelFileError, match="torchvision has no weights 'IMAGENET1K_V9' for 'resnet34'"):
        resolve_checkpoint("resnet34", "torchvision:IMAGENET1K_V9")
    assert resolve_checkpoint("resnet34", "~/teachers/r34.pth") == Path("~/teachers/r34.pth").expanduser()

    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet34().state_dict(), path)  # another file under torchvision's name
    with pytest.raises(ModelFileError, match=f"{path}: its sha256 does not start with b627a593"):
        check_torchvision_hash(path, sha256_file(path))
    named = path.with_name(f"resnet34-{sha256_file(path)[:8]}.pth")
    path.rename(named)
    check_torchvision_hash(named, sha256_file(named))  # its own hash: accepted
