"""Detection backbones that start from an ImageNet classifier file (``backbones: {arch: file}``), as
the published detection students do: loaded, frozen as torchvision does, part of the run's identity,
an input of its Snakemake job and DVC stage, refused by key when missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from tests.conftest import copy_repo
from tests.snakemake_runs import snakemake
from tskd.errors import ParamsError, TskdError
from tskd.spec.config import parse_preset
from tskd.spec.grid import student_jobs, student_spec, teacher_spec

REPO = Path(__file__).resolve().parents[1]
ARCH = "fasterrcnn_resnet18_fpn"


def _raw(backbones: dict) -> dict:
    raw = yaml.safe_load((REPO / "params/coco_smoke.yaml").read_text())
    raw["backbones"] = backbones
    return raw


@pytest.fixture(scope="module")
def imagenet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18-imagenet.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_the_specs_carry_the_file_and_it_is_loaded_frozen(imagenet_file):
    from tskd.engine.trainer import _student

    p = parse_preset(_raw({ARCH: str(imagenet_file)}))
    spec = student_spec(p, student_jobs(p)[0])
    assert spec.backbone_path == str(imagenet_file) and teacher_spec(p, ARCH).backbone_path == str(imagenet_file)
    assert "backbone_path" not in spec.identity()  # a path is placement; the trainer keys on the content
    model, sha = _student(spec, 45, {"min_size": 64, "max_size": 96})
    weights = torch.load(imagenet_file, weights_only=True)
    assert torch.equal(model.backbone.body.conv1.weight, weights["conv1.weight"])
    body = model.backbone.body
    assert not body.conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad  # torchvision's freeze
    from tskd.data.integrity import sha256_file

    assert sha == sha256_file(imagenet_file)
    scratch, none = _student(spec.model_copy(update={"backbone_path": None}), 45, {"min_size": 64, "max_size": 96})
    assert none is None and scratch.backbone.body.conv1.weight.requires_grad


def test_a_backbone_for_an_architecture_the_preset_does_not_train_is_refused():
    with pytest.raises(ParamsError, match=r"backbones\.fasterrcnn_resnet50_fpn: not a detection architecture of "
                                          r"this preset's teachers or pairs \(fasterrcnn_resnet18_fpn\)"):
        parse_preset(_raw({"fasterrcnn_resnet50_fpn": "x.pth"}))
    with pytest.raises(TskdError, match="backbones.fasterrcnn_resnet18_fpn: 'torchvision:NOPE': torchvision has no "
                                        "weights 'NOPE' for 'resnet18'"):
        from tskd.spec.grid import backbone_file

        backbone_file(parse_preset(_raw({ARCH: "torchvision:NOPE"})), ARCH)


@pytest.mark.slow
def test_snakemake_takes_the_file_as_an_input_and_refuses_a_missing_one(tmp_path, imagenet_file):
    repo = copy_repo(tmp_path / "repo")
    cfg = repo / "params/coco_smoke.yaml"
    cfg.write_text(yaml.safe_dump(_raw({ARCH: str(imagenet_file)})))
    out = snakemake(repo, "-n", "--configfile", "params/coco_smoke.yaml").stdout
    assert str(imagenet_file) in out  # an input of the teacher's and the students' jobs
    cfg.write_text(yaml.safe_dump(_raw({ARCH: str(tmp_path / "missing.pth")})))
    r = snakemake(repo, "-n", "--configfile", "params/coco_smoke.yaml", check=False)
    assert r.returncode != 0 and f"backbones.{ARCH}: {tmp_path / 'missing.pth'} is not a file" in r.stderr


def test_the_dvc_stages_depend_on_the_file(imagenet_file):
    from tskd.workflow.dvc_pipeline import stages

    raw = _raw({ARCH: str(imagenet_file)})
    all_stages = stages(parse_preset(raw), raw, "params/coco_smoke.yaml")
    training = [s for s in all_stages if s.rule in ("teacher", "student")]
    assert training and all(str(imagenet_file) in s.deps for s in training)
