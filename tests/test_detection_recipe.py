"""Where mdistiller's detection recipe (detectron2) and torchvision's reference differ, each a named param
(issue #25): its default is torchvision's (today's runs unchanged), the `coco` preset's `mdistiller` recipe
sets mdistiller's value, and the param changes what it says and the run's identity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.test_detection_methods import _batch  # two small images, two boxes
from tskd.errors import ParamsError
from tskd.spec.config import load_preset, parse_preset
from tskd.spec.grid import RunSpec, student_jobs, student_spec

REPO = Path(__file__).resolve().parents[1]
SMALL = {"min_size": 64, "max_size": 96}


def _raw(name: str = "coco_smoke") -> dict:
    return yaml.safe_load((REPO / f"params/{name}.yaml").read_text())


def _spec(**recipe) -> RunSpec:
    p = parse_preset(_raw())
    spec = student_spec(p, student_jobs(p)[0])
    return spec.model_copy(update={"recipe": spec.recipe.model_copy(update=recipe)})


def _proposals_reaching_the_roi_heads(spec: RunSpec) -> list[int]:
    from tskd.engine.trainer import _student

    torch.manual_seed(0)
    model, _ = _student(spec, 45, SMALL)
    seen: list[int] = []
    sample = model.roi_heads.select_training_samples

    def spy(proposals, targets):
        seen.extend(len(p) for p in proposals)
        return sample(proposals, targets)

    model.roi_heads.select_training_samples = spy
    model.train()
    model.train_step(*_batch())
    return seen


def test_rpn_post_nms_top_n_train_is_how_many_proposals_reach_the_roi_heads():
    default = _spec()
    assert default.recipe.rpn_post_nms_top_n_train == 2000  # torchvision's
    counts = _proposals_reaching_the_roi_heads(default)
    assert len(counts) == 2 and min(counts) > 50 and max(counts) <= 2000
    assert _proposals_reaching_the_roi_heads(_spec(rpn_post_nms_top_n_train=50)) == [50, 50]
    assert default.identity() != _spec(rpn_post_nms_top_n_train=1000).identity()


def test_a_detection_setting_in_a_classification_preset_is_refused():
    raw = _raw("smoke")
    recipe = next(iter(raw["recipes"]))
    raw["recipes"][recipe]["rpn_post_nms_top_n_train"] = 1000
    with pytest.raises(ParamsError, match=rf"recipes\.{recipe}\.rpn_post_nms_top_n_train: a detection setting"):
        parse_preset(raw)


def test_a_classification_preset_written_out_whole_parses_again():
    # The report rule's JSON file is the parsed preset dumped with every default: the detection
    # settings' defaults are in it, and must not be refused as set.
    p = parse_preset(_raw("smoke"))
    again = parse_preset(p.model_dump(mode="json"))
    assert again.recipes["student"].rpn_post_nms_top_n_train == 2000


def test_the_coco_presets_mdistiller_recipe_is_mdistillers_and_torchvisions_is_torchvisions():
    p = load_preset(REPO / "params/coco.yaml")
    md, tv = p.recipes["mdistiller"], p.recipes["torchvision"]
    # detectron2's Base-RCNN-FPN: MODEL.RPN.POST_NMS_TOPK_TRAIN 1000
    assert md.rpn_post_nms_top_n_train == 1000 and tv.rpn_post_nms_top_n_train == 2000
    # mdistiller's MobileNetV2 configs: FREEZE_AT 0; its ResNets detectron2's FREEZE_AT 2 = torchvision's default 3
    assert md.trainable_backbone_layers == {"fasterrcnn_mobilenet_v2_fpn": 6} and tv.trainable_backbone_layers == {}
    # detectron2's SOLVER.WEIGHT_DECAY_NORM 0; torchvision's --norm-weight-decay none: as weight_decay
    assert md.weight_decay_norm == 0.0 and tv.weight_decay_norm is None
    # mdistiller distils over detectron2's contiguous 80 classes (and background)
    for pair in p.pairs:
        for method in ("kd", "dkd", "tskd"):
            assert p.method_params(method, pair, "mdistiller")["distill_classes"] == "dataset"
            assert student_spec(p, next(j for j in student_jobs(p) if j.method == method and j.pair == pair)
                                ).method_params["distill_classes"] == "dataset"


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory) -> Path:
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-imagenet.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


def _frozen_stages(spec: RunSpec) -> set[str]:
    from tskd.engine.trainer import _student

    model, _ = _student(spec, 45, SMALL)
    return {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad}


def test_trainable_backbone_layers_is_which_backbone_stages_train(mobilenet_file):
    arch = "fasterrcnn_mobilenet_v2_fpn"
    default = _spec().model_copy(update={"arch": arch, "backbone_path": str(mobilenet_file)})
    assert default.recipe.trainable_backbone_layers == {}
    # torchvision's 3 of 6 stages: features[0:7] (stages 0-2) frozen, from features[7] on trained
    assert _frozen_stages(default) == {str(i) for i in range(7)}
    whole = _spec(trainable_backbone_layers={arch: 6}).model_copy(
        update={"arch": arch, "backbone_path": str(mobilenet_file)})
    assert _frozen_stages(whole) == set()
    other = _spec(trainable_backbone_layers={"fasterrcnn_resnet18_fpn": 5}).model_copy(
        update={"arch": arch, "backbone_path": str(mobilenet_file)})
    assert _frozen_stages(other) == _frozen_stages(default)  # another architecture's entry
    # From scratch every stage trains, whatever the recipe says (torchvision's rule).
    assert _frozen_stages(whole.model_copy(update={"backbone_path": None})) == set()
    assert _frozen_stages(default.model_copy(update={"backbone_path": None})) == set()
    assert default.identity() != whole.identity()


def test_trainable_backbone_layers_names_a_detector():
    raw = _raw()
    raw["recipes"]["student"]["trainable_backbone_layers"] = {"fasterrcnn_mobilenet_v2_fpn": 6}
    parse_preset(raw)  # not in this grid, but a detector: a reduced grid keeps its recipe
    raw["recipes"]["student"]["trainable_backbone_layers"] = {"resnet8": 3}
    with pytest.raises(ParamsError, match=r"recipes\.student\.trainable_backbone_layers\.resnet8: not a detection "
                                          r"architecture \(fasterrcnn_mobilenet_v2_fpn, "):
        parse_preset(raw)
    raw["recipes"]["student"]["trainable_backbone_layers"] = {"fasterrcnn_resnet18_fpn": 7}
    with pytest.raises(ParamsError, match=r"trainable_backbone_layers\.fasterrcnn_resnet18_fpn"):
        parse_preset(raw)


def test_weight_decay_norm_is_the_decay_of_the_normalisation_layers_parameters():
    from tskd.distill import DistillContext, build_distiller, parse_method_params
    from tskd.engine.trainer import decay_groups
    from tskd.models import create_model

    torch.manual_seed(0)
    student = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL)  # from scratch: BatchNorm trains
    teacher = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL, pretrained_backbone=True)
    raw = parse_method_params("reviewkd", {}, task="detection").model_dump(mode="json")
    ctx = DistillContext(num_classes=19, image_size=(64, 96), epochs=2, num_train=8)
    d = build_distiller("reviewkd", student, teacher, raw, ctx, task="detection")
    params = list(d.trainable_parameters())
    assert decay_groups(d, params, None) is params  # null: one group, as before the param
    decayed, norm = decay_groups(d, params, 0.0)
    names = {id(p): n for n, p in d.named_parameters()}
    norm_names = {names[id(p)] for p in norm["params"]}
    assert norm["weight_decay"] == 0.0 and "weight_decay" not in decayed
    assert len(decayed["params"]) + len(norm["params"]) == len(params)
    assert "student.backbone.body.bn1.weight" in norm_names and "student.backbone.body.bn1.bias" in norm_names
    assert any(n.startswith("abfs.") for n in norm_names)  # ReviewKD's ABF BatchNorm
    assert norm_names == {f"{m}.{k}" for m, mod in d.named_modules() if isinstance(mod, torch.nn.BatchNorm2d)
                          for k, _ in mod.named_parameters(recurse=False)}
    assert "student.backbone.body.conv1.weight" in {names[id(p)] for p in decayed["params"]}
    opt = torch.optim.SGD(decay_groups(d, params, 0.0), lr=0.1, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert _spec().recipe.weight_decay_norm is None
    assert _spec().identity() != _spec(weight_decay_norm=0.0).identity()


def test_the_trainers_optimizer_takes_the_norm_decay(make_spec):
    from tskd.engine.trainer import Trainer

    one = Trainer(make_spec("a")).optimizer.param_groups  # null: one group, every parameter at weight_decay
    assert [g["weight_decay"] for g in one] == [5e-4]
    two = Trainer(make_spec("b", recipe={"weight_decay_norm": 0.0})).optimizer.param_groups
    assert [g["weight_decay"] for g in two] == [5e-4, 0.0]
    assert sum(len(g["params"]) for g in two) == len(one[0]["params"]) and len(two[1]["params"]) > 0


@pytest.mark.parametrize("method", ["kd", "dkd", "tskd"])
def test_distill_classes_is_the_width_of_the_logits_kd_and_dkd_see(method, monkeypatch):
    import tskd.distill.detection.logits as logits_module
    import tskd.distill.detection.tskd as tskd_module
    from tskd.distill import DistillContext, build_distiller, parse_method_params
    from tskd.models import create_model

    seen: list[tuple[int, list[int]]] = []  # (width, labels) of each call

    def spy(loss):
        def wrapped(s, t, *rest):  # kd_loss(s, t, T), dkd_terms(s, t, labels, T)
            seen.append((s.shape[1], rest[0].tolist() if len(rest) == 2 else []))
            return loss(s, t, *rest)
        return wrapped

    for module, name in ((logits_module, "kd_loss"), (logits_module, "dkd_terms"), (tskd_module, "kd_loss")):
        monkeypatch.setattr(module, name, spy(getattr(module, name)))
    # 19 outputs, of which the dataset uses 3 and 18 (COCO's ids, with gaps), and background
    classes = tuple("__background__" if i == 0 else ("cat" if i == 3 else "dog" if i == 18 else "")
                    for i in range(19))
    ctx = DistillContext(num_classes=19, image_size=(64, 96), epochs=4, num_train=8, classes=classes)
    for distill_classes, width in (("head", 19), ("dataset", 3)):
        torch.manual_seed(0)
        student = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL)
        teacher = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL, pretrained_backbone=True)
        extra = {"delta": 1, "k": 1} if method == "tskd" else {}  # a schedule that fits 4 epochs
        raw = parse_method_params(method, {"distill_classes": distill_classes, **extra}, task="detection")
        d = build_distiller(method, student, teacher, raw.model_dump(mode="json"), ctx, task="detection")
        d.train()
        seen.clear()
        logits, losses = d.forward_train(*_batch(), 0)
        assert logits.shape[1] == 19  # the detector's own loss keeps every output
        assert [w for w, _ in seen] == [width] and all(torch.isfinite(v) for v in losses.values())
        if method == "dkd":  # the proposals' labels renumbered: 3 -> 1, 18 -> 2, background 0
            labels = seen[0][1]
            assert set(labels) <= ({0, 3, 18} if width == 19 else {0, 1, 2}) and len(set(labels)) == 3
    assert parse_method_params(method, {}, task="detection").distill_classes == "head"


def test_distill_classes_dataset_needs_the_datasets_classes():
    from tskd.distill import DistillContext, build_distiller, parse_method_params
    from tskd.models import create_model

    student = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL)
    teacher = create_model("fasterrcnn_resnet18_fpn", num_classes=19, **SMALL, pretrained_backbone=True)
    raw = parse_method_params("kd", {"distill_classes": "dataset"}, task="detection").model_dump(mode="json")
    with pytest.raises(ValueError, match="distill_classes 'dataset' needs the dataset's classes"):
        build_distiller("kd", student, teacher, raw,
                        DistillContext(num_classes=19, image_size=(64, 96), epochs=4, num_train=8), task="detection")
