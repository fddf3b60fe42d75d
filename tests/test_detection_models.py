"""Detection models: torchvision's Faster R-CNN + FPN, unmodified, with ``train_step`` for distillers.

Small CPU checks (64..96 px images, batch 2): every factory builds with p2..p6; ``train_step``
gives torchvision's own training losses under the same RNG state; a teacher's box head run on the
student's proposals is what the student's step computed; eval ``forward`` is torchvision's; weight
files (torchvision detection state dicts, ImageNet backbones) load strictly or are refused by name.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN

from tskd.models import create_model, list_models, model_entry
from tskd.models.detection import FPN_LEVELS, DetectionStep, DistillableFasterRCNN, load_backbone_weights
from tskd.models.published import ModelFileError, load_published_checkpoint
from tskd.models.summary import model_table

# Two short sides so the training resize draws a random number (part of the RNG the test matches).
SMALL = {"min_size": (56, 64), "max_size": 96, "box_score_thresh": 0.0}
NAMES = ["fasterrcnn_mobilenet_v2_fpn", "fasterrcnn_resnet101_fpn", "fasterrcnn_resnet18_fpn",
         "fasterrcnn_resnet50_fpn"]


def _batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 60, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 78.0, 44.0]]), "labels": torch.tensor([1, 18])},
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([3])},
    ]
    return images, targets


@pytest.fixture(scope="module")
def r18() -> DistillableFasterRCNN:
    torch.manual_seed(0)
    return create_model("fasterrcnn_resnet18_fpn", **SMALL)


@pytest.fixture(scope="module")
def step(r18) -> DetectionStep:
    r18.train()
    torch.manual_seed(7)
    return r18.train_step(*_batch())


def test_the_detection_models_are_registered():
    assert list_models("detection") == NAMES
    assert {model_entry(n).default_classes for n in NAMES} == {91}
    rows = {r["name"]: r["params"] for r in model_table("detection")}
    # torchvision's published count (COCO, 91 classes) is the trained layout's, FrozenBatchNorm2d (no
    # parameters in the norms); the table lists the from-scratch build, whose BatchNorm adds its affines.
    r50 = create_model("fasterrcnn_resnet50_fpn", pretrained_backbone=True)
    assert sum(p.numel() for p in r50.parameters()) == 41_755_286
    bn = sum(m.weight.numel() * 2 for m in create_model("fasterrcnn_resnet50_fpn").backbone.body.modules()
             if isinstance(m, torch.nn.BatchNorm2d))
    assert rows["fasterrcnn_resnet50_fpn"] == 41_755_286 + bn


@pytest.mark.parametrize("name", NAMES)
def test_each_factory_builds_torchvision_faster_rcnn_with_p2_to_p6(name):
    model = create_model(name, num_classes=5, min_size=64, max_size=96).eval()
    assert isinstance(model, FasterRCNN) and type(model).forward is FasterRCNN.forward
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert (model.transform.min_size, model.transform.max_size) == ((64,), 96)
    assert model.fpn_levels == FPN_LEVELS == {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}
    with torch.no_grad():
        feats = model.features_of(torch.rand(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 256, math.ceil(64 / s), math.ceil(96 / s))
                                               for s in FPN_LEVELS.values()]
    # Trained from scratch (torchvision's weights=None rule): plain BatchNorm, every layer trainable.
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.body.modules())
    # From a pretrained backbone: FrozenBatchNorm2d and torchvision's default freezing, the stem and
    # first stage (ResNet), blocks 0..6 of 18 (MobileNetV2).
    pretrained = create_model(name, num_classes=5, min_size=64, max_size=96, pretrained_backbone=True)
    frozen = {n.split(".")[0] for n, p in pretrained.backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == ({str(i) for i in range(7)} if "mobilenet" in name else {"conv1", "layer1"})
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pretrained.backbone.body.modules())


def test_train_step_losses_are_torchvisions_training_forward(r18, step):
    r18.train()
    torch.manual_seed(7)  # the same RNG state: resize choice, RPN and RoI samplers draw the same
    reference = r18(*_batch())
    assert set(step.losses) == set(reference) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier",
                                                  "loss_box_reg"}
    for key, value in reference.items():
        assert torch.equal(step.losses[key], value), key
    sum(step.losses.values()).backward()  # the step's graph reaches the trainable weights
    assert r18.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert r18.backbone.fpn.layer_blocks[0][0].weight.grad is not None
    r18.zero_grad(set_to_none=True)


def test_train_step_contract(step):
    b, c, h, w = step.padded.shape
    assert (b, c) == (2, 3) and h % 32 == 0 and w % 32 == 0
    assert all(ih <= h and iw <= w for ih, iw in step.image_sizes) and len(step.image_sizes) == 2
    assert [tuple(f.shape) for f in step.features] == [(2, 256, math.ceil(h / s), math.ceil(w / s))
                                                       for s in FPN_LEVELS.values()]
    n = sum(len(p) for p in step.proposals)
    assert len(step.proposals) == 2 and all(p.shape[1] == 4 for p in step.proposals)
    assert step.roi_logits.shape == (n, 91) and step.roi_labels.shape == (n,)
    assert step.roi_labels.dtype == torch.int64 and set(step.roi_labels.tolist()) <= {0, 1, 3, 18}
    assert (step.roi_labels > 0).any()  # the ground-truth boxes are among the sampled proposals


def test_a_teacher_runs_its_box_head_on_the_students_proposals(r18, step):
    with torch.no_grad():
        again = r18.roi_logits_on(r18.features_of(step.padded), step.proposals, step.image_sizes)
        torch.manual_seed(0)
        teacher = create_model("fasterrcnn_mobilenet_v2_fpn", min_size=64, max_size=96).eval()
        teacher_logits = teacher.roi_logits_on(teacher.features_of(step.padded), step.proposals, step.image_sizes)
    torch.testing.assert_close(again, step.roi_logits.detach(), rtol=0, atol=0)
    assert teacher_logits.shape == step.roi_logits.shape


def test_train_step_refuses_eval_mode_and_bad_targets(r18):
    images, targets = _batch()
    with pytest.raises(RuntimeError, match="training mode"):
        r18.eval().train_step(images, targets)
    r18.train()
    with pytest.raises(TypeError, match="int64"):
        r18.train_step(images, [{**t, "labels": t["labels"].int()} for t in targets])
    flat = [{**targets[0], "boxes": torch.tensor([[4.0, 6.0, 4.0, 50.0]]), "labels": torch.tensor([1])}, targets[1]]
    with pytest.raises(ValueError, match="positive height and width"):
        r18.train_step(images, flat)


def test_eval_forward_returns_torchvisions_detections(r18):
    r18.eval()
    reference = FasterRCNN(copy.deepcopy(r18.backbone), num_classes=91, min_size=(56, 64), max_size=96,
                           box_score_thresh=0.0).eval()
    reference.load_state_dict(r18.state_dict(), strict=True)
    images, _ = _batch()
    with torch.no_grad():
        ours, theirs = r18(images), reference(images)
    assert len(ours) == 2 and len(ours[0]["boxes"]) > 0
    for a, b in zip(ours, theirs, strict=True):
        assert a.keys() == b.keys() == {"boxes", "labels", "scores"}
        for key in a:
            assert torch.equal(a[key], b[key]), key


def _legacy_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as torchvision < 0.13 saved it (the COCO_V1 files): RPN and FPN convs one level
    less deep (``rpn.head.conv.weight``, ``backbone.fpn.inner_blocks.0.weight``), FrozenBatchNorm2d
    (no ``num_batches_tracked``)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("rpn.head.conv.0.0."):
            key = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        elif key.startswith("backbone.fpn.") and "_blocks." in key:
            module, _, kind = key.rsplit(".", 2)  # backbone.fpn.inner_blocks.<i>, 0, weight
            key = f"{module}.{kind}"
        out[key] = value
    return out


def test_torchvisions_detection_state_dict_loads_strictly(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    saved = tv.state_dict()
    path = tmp_path / "fasterrcnn_resnet50_fpn.pth"
    torch.save(saved, path)
    ours = load_published_checkpoint(path, "fasterrcnn_resnet50_fpn").state_dict()
    assert all(torch.equal(ours[k], saved[k]) for k in ours)  # BatchNorm counters aside, every key
    # The COCO_V1 file's layout (torchvision < 0.13, FrozenBatchNorm2d): old RPN/FPN conv keys, no counters.
    legacy = _legacy_layout(saved)
    assert "rpn.head.conv.weight" in legacy and "backbone.fpn.inner_blocks.3.weight" in legacy
    torch.save(legacy, path)
    ours = load_published_checkpoint(path, "fasterrcnn_resnet50_fpn").state_dict()
    assert torch.equal(ours["rpn.head.conv.0.0.weight"], saved["rpn.head.conv.0.0.weight"])
    assert torch.equal(ours["backbone.fpn.inner_blocks.3.0.weight"], saved["backbone.fpn.inner_blocks.3.0.weight"])

    del legacy["roi_heads.box_head.fc7.bias"]
    torch.save(legacy, path)
    with pytest.raises(ModelFileError, match=r"(?s)fasterrcnn_resnet50_fpn\.pth.*missing keys.*box_head\.fc7\.bias"):
        load_published_checkpoint(path, "fasterrcnn_resnet50_fpn")
    path.write_bytes(path.read_bytes()[:4096])  # a damaged download
    with pytest.raises(ModelFileError, match=r"fasterrcnn_resnet50_fpn\.pth"):
        load_published_checkpoint(path, "fasterrcnn_resnet50_fpn")


def test_load_backbone_weights_takes_torchvisions_imagenet_files_strictly(tmp_path, r18):
    student = create_model("fasterrcnn_resnet18_fpn", **SMALL, pretrained_backbone=True)
    resnet18 = torchvision.models.resnet18().state_dict()
    torch.save(resnet18, tmp_path / "resnet18.pth")
    load_backbone_weights(student, tmp_path / "resnet18.pth")
    body = student.backbone.body.state_dict()
    assert torch.equal(body["conv1.weight"], resnet18["conv1.weight"])
    assert torch.equal(body["layer4.1.bn2.running_var"], resnet18["layer4.1.bn2.running_var"])
    assert not student.backbone.body.conv1.weight.requires_grad  # frozen layers stay frozen

    mobile = create_model("fasterrcnn_mobilenet_v2_fpn", min_size=64, max_size=96, pretrained_backbone=True)
    mobilenet_v2 = torchvision.models.mobilenet_v2().state_dict()
    torch.save(mobilenet_v2, tmp_path / "mobilenet_v2.pth")
    load_backbone_weights(mobile, tmp_path / "mobilenet_v2.pth")
    assert torch.equal(mobile.backbone.body.state_dict()["18.0.weight"], mobilenet_v2["features.18.0.weight"])

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ModelFileError, match=r"(?s)resnet34\.pth.*unexpected keys, e\.g\. layer1\.2\."):
        load_backbone_weights(student, tmp_path / "resnet34.pth")
    with pytest.raises(ModelFileError, match=r"(?s)mobilenet_v2\.pth.*missing keys.*conv1\.weight"):
        load_backbone_weights(student, tmp_path / "mobilenet_v2.pth")
    with pytest.raises(ModelFileError, match=r"(?s)resnet18\.pth.*missing keys.*features\.0\.0\.weight"):
        load_backbone_weights(mobile, tmp_path / "resnet18.pth")
    del resnet18["layer2.0.downsample.1.weight"]
    torch.save(resnet18, tmp_path / "resnet18.pth")
    with pytest.raises(ModelFileError, match=r"(?s)1 missing keys, e\.g\. layer2\.0\.downsample\.1\.weight"):
        load_backbone_weights(student, tmp_path / "resnet18.pth")
