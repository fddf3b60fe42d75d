"""ImageNet data: torchvision's reader on a tiny ImageNet written in the real layout, the data stage's
record, the checks that name what is wrong, and a run trained on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torchvision.datasets import ImageNet

from tskd.data import DatasetError
from tskd.data import imagenet as family
from tskd.data.synthetic_imagenet import write_synthetic_imagenet
from tskd.errors import ParamsError
from tskd.spec.config import ImageNetData, RecipeCfg, parse_preset

SYNTH = {"seed": 0, "classes": 4, "train_per_class": 3, "val_per_class": 2, "image_size": 40}
RECIPE = RecipeCfg(epochs=1, batch_size=6, lr=0.05, normalization="imagenet")


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet") / "imagenet"
    write_synthetic_imagenet(root, **SYNTH)
    family.prepare(_cfg(root))
    return root


def _cfg(root: Path, **kw) -> ImageNetData:
    return ImageNetData(name="imagenet", root=str(root), crop=32, resize=36, **kw)


def test_the_layout_is_torchvisions(tiny_imagenet):
    train, val = ImageNet(str(tiny_imagenet), split="train"), ImageNet(str(tiny_imagenet), split="val")
    assert len(train) == 12 and len(val) == 8
    assert train.wnids == ["n00000000", "n00000001", "n00000002", "n00000003"]
    assert train.classes[0] == ("tench",)  # ImageNet's own class names, from meta.bin
    image, label = val[0]
    assert image.size == (40, 40) and label == 0
    assert sorted(p.suffix for p in (tiny_imagenet / "train").rglob("*.*")) == [".JPEG"] * 12


def test_splits_from_the_prepared_record(tiny_imagenet):
    splits = family.load_splits(_cfg(tiny_imagenet), RECIPE)
    assert splits.num_classes == 4 and len(splits.train) == 12 and len(splits.test) == 8
    assert splits.name == "synthetic-imagenet" and splits.identity.startswith("imagenet manifest sha256:")
    x, y, i = splits.train[0]
    assert x.shape == (3, 32, 32) and splits.image_size == (32, 32)
    assert splits.test[0][0].shape == (3, 32, 32)
    # Same parameters: the same bytes, the same identity; the writer keeps the directory as it is.
    write_synthetic_imagenet(tiny_imagenet, **SYNTH)
    assert family.load_splits(_cfg(tiny_imagenet), RECIPE).identity == splits.identity
    names = [type(t).__name__ for t in splits.train.transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert [type(t).__name__ for t in splits.test.transform.transforms][:2] == ["Resize", "CenterCrop"]


def test_a_class_missing_from_val_and_a_missing_split_are_named(tiny_imagenet, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_imagenet, root)
    shutil.rmtree(root / "val" / "n00000002")
    with pytest.raises(DatasetError) as e:
        family.load_splits(_cfg(root), RECIPE)
    assert f"{root / 'train'} and {root / 'val'} hold different classes" in str(e.value)
    assert "n00000002" in str(e.value)
    shutil.rmtree(root / "val")
    with pytest.raises(DatasetError, match=f"missing {root / 'val'}.*run the data stage first"):
        family.load_splits(_cfg(root), RECIPE)


def test_archives_are_checked_against_their_official_md5(tmp_path):
    root = tmp_path / "archives"
    root.mkdir()
    with pytest.raises(DatasetError, match=f"ImageNet not found at {root}: put the official archives"):
        family.prepare(_cfg(root))
    for name in family.ARCHIVES.values():
        (root / name).write_bytes(b"not the official archive")
    with pytest.raises(DatasetError) as e:
        family.prepare(_cfg(root))
    assert "preparing the train split from the archives failed" in str(e.value)
    assert "ILSVRC2012_devkit_t12.tar.gz is not present in the root directory or is corrupted" in str(e.value)
    assert family.versioned_inputs(_cfg(root)) == [str(root / n) for n in family.ARCHIVES.values()]


def test_a_teacher_and_a_kd_student_train_on_it(tiny_imagenet, make_spec):
    from tskd.engine.trainer import train

    data = _cfg(tiny_imagenet)
    recipe = {"epochs": 1, "batch_size": 6, "milestones": [], "normalization": "imagenet"}
    teacher = make_spec(out="t", arch="resnet34", dataset=data, recipe=recipe)
    m = train(teacher)
    assert m["dataset"] == "synthetic-imagenet" and 0 <= m["last_top1"] <= 100
    exported = torch.load(Path(teacher.out_dir) / "model.pt", weights_only=True)
    assert exported["input"]["image_size"] == [32, 32] and exported["num_classes"] == 4
    student = make_spec(out="s", method="kd", arch="resnet18", teacher_arch="resnet34",
                        teacher_path=str(Path(teacher.out_dir) / "model.pt"), dataset=data, recipe=recipe)
    assert len(train(student)["history"]) == 1


def test_imagenet_presets_refuse_cifar_keys(repo_root, tmp_path):
    import yaml

    raw = yaml.safe_load((repo_root / "params/smoke.yaml").read_text())
    raw["dataset"] = {"name": "imagenet", "synthetic": dict(SYNTH), "crop": 32, "resize": 36}
    assert parse_preset(raw).dataset.crop == 32
    raw["dataset"]["download"] = True
    with pytest.raises(ParamsError, match=r"dataset\.download: unknown key"):
        parse_preset(raw, "p.yaml")
    raw["dataset"] = {"name": "imagenet", "synthetic": {"train_per_class": 2, "nuisance_scale": 0.3}}
    with pytest.raises(ParamsError, match=r"dataset\.synthetic\.nuisance_scale: unknown key"):
        parse_preset(raw, "p.yaml")
