"""The methods on detection: each builds on a tiny Faster R-CNN pair, gives the detector's own losses
plus its own term, trains the student (and its own modules) and never the teacher."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tskd.distill import DistillContext, build_distiller, list_methods, parse_method_params
from tskd.models import create_model

SMALL = {"min_size": 64, "max_size": 96}
CTX = DistillContext(num_classes=19, image_size=(64, 96), epochs=4, num_train=8, train_labels=None)


def _batch():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 60, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([18])},
               {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([3])}]
    return images, targets


def _build(method: str, params: dict | None = None):
    torch.manual_seed(0)
    student = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL)
    teacher = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=19, **SMALL, pretrained_backbone=True)
    raw = parse_method_params(method, params or {}, task="detection").model_dump(mode="json")
    d = build_distiller(method, student, teacher, raw, CTX, task="detection")
    d.train()
    return d


def test_every_detection_method_is_registered():
    assert list_methods("detection") == ["dkd", "kd", "reviewkd", "tskd", "vanilla"]
    with pytest.raises(Exception, match="unknown method 'crd' for detection"):
        parse_method_params("crd", {}, task="detection")


@pytest.mark.parametrize(("method", "own"), [("vanilla", set()), ("kd", {"kd"}), ("dkd", {"tckd", "nckd"}),
                                             ("reviewkd", {"review"})])
def test_a_step_gives_the_detector_losses_and_the_methods_term(method, own):
    d = _build(method)
    images, targets = _batch()
    logits, losses = d.forward_train(images, targets, 0)
    assert set(losses) == {"objectness", "rpn_box_reg", "classifier", "box_reg"} | own
    assert logits.shape[1] == 19 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    if d.needs_teacher:
        assert all(p.grad is None for p in d.teacher.parameters())
    assert d.student.roi_heads.box_predictor.cls_score.weight.grad is not None
    if method == "reviewkd":
        assert all(p.grad is not None for p in d.abfs.parameters())
    # Evaluation: the student's own detections (torchvision's eval forward).
    d.eval()
    with torch.no_grad():
        out = d(images)
    assert len(out) == 2 and {"boxes", "labels", "scores"} <= set(out[0])


def test_tskd_reviews_fpn_levels_from_its_backbone_snapshots():
    d = _build("tskd", {"delta": 1, "k": 1, "levels": [0, 1, 2]})
    images, targets = _batch()
    _, losses = d.forward_train(images, targets, 0)
    assert "review" not in losses and {"kd"} <= set(losses)
    d.on_epoch_end(0)  # memory node: a snapshot of the backbone + FPN
    assert d.memory.epochs == (0,)
    assert all(name.startswith(("body.", "fpn.")) for name in d.memory.slot(0))
    with torch.no_grad():  # the student trains on: its maps move away from the snapshot's
        for p in d.student.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d.on_epoch_start(1)
    _, losses = d.forward_train(images, targets, 1)
    assert losses["review"] > 0
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.forecasters.parameters())
    before = {k: v.clone() for k, v in d.memory.slot(0).items()}
    d.forward_train(images, targets, 1)  # snapshots run with batch statistics and are never written to
    assert all(torch.equal(before[k], d.memory.slot(0)[k]) for k in before)
    with pytest.raises(Exception, match="levels"):
        _build("tskd", {"delta": 1, "k": 1, "levels": [5]})


def test_tskd_schedule_in_iterations_snapshots_and_reviews_by_step():
    # 4 epochs of 4 steps; a node every 3 steps lasting 2: memory 0-1 (slot 0), 3-4 (slot 1), review
    # 6-7, memory 9-10 and 12-13, review 15; steps 2, 5, 8, 11, 14 are general.
    params = {"schedule_unit": "iterations", "delta": 3, "k": 2, "node_iters": 2, "levels": [0]}
    ctx = dataclasses.replace(CTX, steps_per_epoch=4)
    torch.manual_seed(0)
    student = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL)
    teacher = create_model("fasterrcnn_mobilenet_v2_fpn", num_classes=19, **SMALL, pretrained_backbone=True)
    raw = parse_method_params("tskd", params, task="detection").model_dump(mode="json")
    d = build_distiller("tskd", student, teacher, raw, ctx, task="detection")
    reviews, stored = [], {}
    for step in range(16):
        if step % 4 == 0:
            d.on_epoch_start(step // 4)
        d.on_step_start(step)
        if d.reviewing(step // 4):
            reviews.append(step)
        d.on_step_end(step)
        if step % 4 == 3:
            d.on_epoch_end(step // 4)  # an epoch's end stores nothing in an iteration schedule
        stored[step] = d.memory.epochs
        if step == 5:  # a resume from a checkpoint taken here reviews the same snapshots
            state = d.state_dict()
    assert reviews == [6, 7, 15]
    assert stored[0] == (None, None) and stored[1] == (0, None) and stored[4] == (0, 3) and stored[13] == (9, 12)
    again = build_distiller("tskd", create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL), teacher, raw,
                            ctx, task="detection")
    again.load_state_dict(state)
    again.on_step_start(6)
    images, targets = _batch()
    _, losses = again.forward_train(images, targets, 1)
    assert "review" in losses and again.memory.epochs == (0, 3)
    with pytest.raises(Exception, match="review step"):  # 4 steps: nodes 0 and 3 are both memory nodes
        build_distiller("tskd", student, teacher, raw, dataclasses.replace(CTX, epochs=1, steps_per_epoch=4),
                        task="detection")
    with pytest.raises(Exception, match="node_iters"):
        parse_method_params("tskd", {"delta": 3, "node_iters": 2}, task="detection")
