"""COCO detection data: a tiny COCO written in the real layout and read back by torchvision's reader and
pycocotools, the items' contract, the boxes training drops, the flip, the checks that refuse a malformed
annotation file by file and entry, and the zips' extraction (once, redone when interrupted)."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pydantic import TypeAdapter, ValidationError
from torchvision.datasets import CocoDetection

from tskd.data import DatasetError
from tskd.data import coco as family
from tskd.data.families import TASK_OF
from tskd.data.families import family as family_module
from tskd.data.integrity import MANIFEST_NAME
from tskd.data.synthetic_coco import CATEGORIES, write_synthetic_coco_zips
from tskd.spec.config import CocoData, CocoSyntheticCfg, DatasetCfg, RecipeCfg

# pycocotools' mask decoding under numpy 2: its warning, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

SYNTH = CocoSyntheticCfg(seed=0, train_images=12, val_images=8, min_image_size=64, max_image_size=96, categories=5)
RECIPE = RecipeCfg(epochs=1, batch_size=4, lr=0.01, normalization="imagenet", augment=())
FLIP = RecipeCfg(epochs=1, batch_size=4, lr=0.01, normalization="imagenet", augment=("flip",))
IDS = [1, 3, 7, 18, 44]
TRAIN_JSON, VAL_JSON = family.ANNOTATIONS["train"], family.ANNOTATIONS["test"]


def _cfg(root: Path, **kw) -> CocoData:
    return CocoData(name="coco", root=str(root), min_size=64, max_size=96, **kw)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco") / "coco"
    family.prepare(_cfg(root, synthetic=SYNTH))
    return root


@pytest.fixture(scope="module")
def splits(synthetic):
    return family.load_splits(_cfg(synthetic, synthetic=SYNTH), RECIPE)


@pytest.fixture
def layout(synthetic, tmp_path) -> Path:
    """A copy of the synthetic set as a user's extracted layout: no manifest, not prepared yet."""
    root = tmp_path / "coco"
    shutil.copytree(synthetic, root, ignore=shutil.ignore_patterns(MANIFEST_NAME, family.PREPARED))
    return root


def _anns(coco: COCO, image_id: int) -> list[dict]:
    return coco.loadAnns(coco.getAnnIds(imgIds=image_id))


def _training_box(a: dict, width: int, height: int) -> bool:
    x, y, w, h = a["bbox"]
    assert x >= 0 and x + w <= width and y >= 0 and y + h <= height  # the synthetic boxes lie inside
    return not a["iscrowd"] and w > 1 and h > 1


def test_the_family_and_its_params():
    assert family_module("coco") is family and TASK_OF["coco"] == "detection"
    cfg = TypeAdapter(DatasetCfg).validate_python({"name": "coco", "root": "/data/coco"})
    assert isinstance(cfg, CocoData) and (cfg.min_size, cfg.max_size) == (800, 1333)
    assert family.versioned_inputs(cfg) == ["/data/coco/train2017.zip", "/data/coco/val2017.zip",
                                            "/data/coco/annotations_trainval2017.zip"]
    with pytest.raises(ValidationError, match="val_fraction"):
        CocoData(name="coco", root="x", val_fraction=0.1)
    with pytest.raises(ValidationError, match="min_size"):
        CocoData(name="coco", root="x", min_size=900, max_size=800)
    with pytest.raises(ValidationError, match="min_image_size"):
        CocoSyntheticCfg(min_image_size=200, max_image_size=100)


def test_the_synthetic_set_is_cocos_layout(synthetic):
    train = CocoDetection(str(synthetic / "train2017"), str(synthetic / TRAIN_JSON))
    assert len(train) == 12 and len(CocoDetection(str(synthetic / "val2017"), str(synthetic / VAL_JSON))) == 8
    image, anns = train[0]
    assert image.mode == "RGB" and (image.width, image.height) == (train.coco.imgs[train.ids[0]]["width"],
                                                                   train.coco.imgs[train.ids[0]]["height"])
    raw = json.loads((synthetic / TRAIN_JSON).read_text())
    assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
    assert raw["categories"][0] == {"supercategory": "person", "id": 1, "name": "person"}
    assert [c["id"] for c in raw["categories"]] == IDS
    assert [im["id"] for im in raw["images"]] != sorted(im["id"] for im in raw["images"])  # listed out of order
    assert all(im["file_name"] == f"{im['id']:012d}.jpg" for im in raw["images"])
    coco = train.coco
    anns = list(coco.anns.values())
    crowd = [a for a in anns if a["iscrowd"]]
    normal = [a for a in anns if not a["iscrowd"]]
    # COCO's segmentations: uncompressed RLE for crowds, polygons otherwise; pycocotools decodes both.
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    assert all(coco.annToMask(a).sum() == a["area"] for a in crowd)
    assert all(isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6 for a in normal)
    big = [a for a in normal if min(a["bbox"][2:]) > 20]
    assert big and all(abs(coco.annToMask(a).sum() - a["area"]) < 0.15 * a["area"] for a in big)
    assert any(min(a["bbox"][2:]) <= 1 for a in normal)  # degenerate
    assert any(1 < min(a["bbox"][2:]) <= 10 for a in normal)  # tiny
    assert any(not coco.imgToAnns[i] for i in coco.imgs)  # no annotation at all
    assert not set(coco.imgs) & set(COCO(str(synthetic / VAL_JSON)).imgs)  # image ids unique over both files
    # Objects are drawn in their category's colour: the middle of a large object's box is that colour.
    colours = {cid: np.array(rgb) for cid, _, _, _, rgb in CATEGORIES}
    for a in big[:6]:
        im = np.asarray(train._load_image(a["image_id"]), dtype=np.float64)
        x, y, w, h = a["bbox"]
        centre = im[int(y + h / 2) - 1:int(y + h / 2) + 2, int(x + w / 2) - 1:int(x + w / 2) + 2].mean(axis=(0, 1))
        assert np.abs(centre - colours[a["category_id"]]).max() < 40, a


def test_items_targets_and_collate(splits, synthetic):
    assert splits.name == "synthetic-coco" and splits.verified_by == "manifest" and splits.val is None
    assert splits.image_size == (64, 96) and splits.collate is family.collate
    assert splits.identity.startswith("coco manifest sha256:")
    for split in (splits.train, splits.test):
        for index in range(len(split)):
            image, target, i = split[index]
            meta = split.coco.imgs[target["image_id"]]
            assert i == index and target["image_id"] == split.image_ids[index]
            assert type(image) is torch.Tensor and image.dtype == torch.float32
            assert image.shape == (3, meta["height"], meta["width"]) and image.min() >= 0 and image.max() <= 1
            assert set(target) == {"boxes", "labels", "image_id"} and type(target["image_id"]) is int
            boxes, labels = target["boxes"], target["labels"]
            assert type(boxes) is torch.Tensor and boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
            assert labels.dtype == torch.int64 and set(labels.tolist()) <= set(IDS)
            assert bool((boxes[:, 2] - boxes[:, 0] > 1).all() and (boxes[:, 3] - boxes[:, 1] > 1).all())
    images, targets, indices = family.collate([splits.train[2], splits.train[0], splits.train[5]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert images[1].shape == splits.train[0][0].shape and targets[2]["image_id"] == splits.train.image_ids[5]
    assert indices.dtype == torch.int64 and indices.tolist() == [2, 0, 5]
    assert splits.train.labels is None  # no single label per image


def test_training_drops_crowd_and_degenerate_boxes_and_the_images_left_without_one(splits):
    coco = splits.train.coco
    training_images = [i for i in sorted(coco.imgs) if any(
        _training_box(a, coco.imgs[i]["width"], coco.imgs[i]["height"]) for a in _anns(coco, i))]
    assert splits.train.image_ids == training_images  # in CocoDetection's (sorted id) order
    skipped = set(coco.imgs) - set(training_images)
    assert any(not _anns(coco, i) for i in skipped)  # no annotation
    assert any(_anns(coco, i) for i in skipped)  # only a crowd and a degenerate box
    dropped = 0
    for index, image_id in enumerate(splits.train.image_ids):
        meta, anns = coco.imgs[image_id], _anns(coco, image_id)
        kept = [a for a in anns if _training_box(a, meta["width"], meta["height"])]
        dropped += len(anns) - len(kept)
        _, target, _ = splits.train[index]
        xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)])
        assert torch.allclose(target["boxes"], xyxy.clamp(min=0), atol=1e-3)
        assert target["labels"].tolist() == [a["category_id"] for a in kept]
    assert dropped >= 2  # crowds and slivers left out of training targets ...
    assert any(a["iscrowd"] for a in splits.test.coco.anns.values())  # ... but scored against in .coco
    assert any(min(a["bbox"][2:]) <= 1 for a in splits.test.coco.anns.values())


def test_which_boxes_train():
    boxes = [{"bbox": [10, 10, 20, 20], "iscrowd": 1},  # crowd
             {"bbox": [1.36, 4.0, 5.0, 1.0], "iscrowd": 0},  # 1 px high (1.36 + 1.0 - 1.36 > 1 in floats)
             {"bbox": [3.0, 4.0, 0.5, 9.0], "iscrowd": 0},  # half a pixel wide
             {"bbox": [-5.0, 0.0, 6.0, 10.0], "iscrowd": 0},  # 1 px of it inside the image
             {"bbox": [-5.0, 0.0, 7.0, 10.0], "iscrowd": 0},  # 2 px inside
             {"bbox": [95.0, 90.0, 10.0, 30.0], "iscrowd": 0},  # 5 x 10 px inside a 100 x 100 image
             {"bbox": [20.0, 20.0, 1.01, 1.01]}]  # no iscrowd key: not a crowd
    assert family.kept_boxes(boxes, 100, 100).tolist() == [False, False, False, False, True, True, True]


def test_a_box_past_the_image_edge_is_clamped(layout):
    data = json.loads((layout / TRAIN_JSON).read_text())
    big = max((a for a in data["annotations"] if not a["iscrowd"]), key=lambda a: a["bbox"][2])
    meta = next(im for im in data["images"] if im["id"] == big["image_id"])
    big["bbox"][2] = meta["width"] - big["bbox"][0] + 7.5  # COCO has boxes a little past the edge
    (layout / TRAIN_JSON).write_text(json.dumps(data))
    family.prepare(_cfg(layout))
    train = family.load_splits(_cfg(layout), RECIPE).train
    _, target, _ = train[train.image_ids.index(big["image_id"])]
    assert target["boxes"][:, 2].max().item() == meta["width"]
    assert target["boxes"][:, 2].tolist().count(meta["width"]) >= 1


def test_a_dataloader_batches_items_with_the_collate(splits):
    from torch.utils.data import DataLoader

    loader = DataLoader(splits.train, batch_sampler=[[(3, 7), (0, 7)], [(1, 7)]], collate_fn=splits.collate)
    (images, targets, indices), (last, _, _) = list(loader)
    assert [im.shape for im in images] == [splits.train[3][0].shape, splits.train[0][0].shape] and len(last) == 1
    assert indices.tolist() == [3, 0] and [t["image_id"] for t in targets] == [splits.train.image_ids[i]
                                                                               for i in (3, 0)]


def test_evaluation_keeps_every_image(splits):
    coco = splits.test.coco
    assert splits.test.image_ids == sorted(coco.imgs) and len(splits.test) == 8
    empty = [k for k, i in enumerate(splits.test.image_ids) if not _anns(coco, i)]
    assert empty
    _, target, _ = splits.test[empty[0]]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_the_flip_moves_the_boxes_with_the_image(synthetic):
    plain = family.load_splits(_cfg(synthetic), RECIPE).train
    flips = family.load_splits(_cfg(synthetic), FLIP).train
    index = max(range(len(plain)), key=lambda k: len(plain[k][1]["labels"]))
    image, target, _ = plain[(index, 0)]
    state = torch.get_rng_state()
    drawn = {seed: flips[(index, seed)] for seed in range(12)}
    assert torch.equal(torch.get_rng_state(), state)  # the draw leaves torch's stream as it was
    flipped = [seed for seed, (im, _, _) in drawn.items() if not torch.equal(im, image)]
    assert flipped and len(flipped) < len(drawn)  # p = 0.5 per (seed, index)
    same = drawn[flipped[0]]
    again = flips[(index, flipped[0])]
    assert torch.equal(again[0], same[0]) and torch.equal(again[1]["boxes"], same[1]["boxes"])  # reproducible
    f_image, f_target, _ = same
    width = image.shape[-1]
    assert torch.equal(f_image, image.flip(-1))
    boxes = target["boxes"]
    mirrored = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    assert torch.allclose(f_target["boxes"], mirrored, atol=1e-4)
    assert torch.equal(f_target["labels"], target["labels"])
    # Each flipped box frames, in the flipped image, the mirror image of what the box framed before.
    for before, after in zip(boxes.tolist(), f_target["boxes"].tolist(), strict=True):
        x1, y1, x2, y2 = math.floor(before[0]), math.floor(before[1]), math.ceil(before[2]), math.ceil(before[3])
        fx1, fx2 = math.floor(after[0] + 1e-3), math.ceil(after[2] - 1e-3)
        assert torch.equal(f_image[:, y1:y2, fx1:fx2], image[:, y1:y2, x1:x2].flip(-1))
    # Without "flip" in the recipe, and in evaluation, never.
    assert all(torch.equal(plain[(index, seed)][0], image) for seed in range(6))
    test = family.load_splits(_cfg(synthetic), FLIP).test
    assert all(torch.equal(test[(0, seed)][0], test[0][0]) for seed in range(6))


def test_non_contiguous_ids_give_cocos_classes(splits, synthetic):
    assert splits.num_classes == 45  # max id + 1: labels are the ids themselves
    assert splits.classes[0] == "__background__" and splits.classes[1] == "person"
    assert splits.classes[3] == "car" and splits.classes[44] == "bottle"
    assert splits.classes[2] == "" and sum(bool(c) for c in splits.classes) == 6
    real = family.class_names({cid: name for cid, name, *_ in CATEGORIES} | {90: "toothbrush", 2: "bicycle"})
    assert len(real) == 91 and real[90] == "toothbrush"  # the real set: 91 classes, as torchvision's COCO_V1
    record = json.loads((synthetic / family.PREPARED).read_text())
    assert record["num_classes"] == 45 and record["items"] == {"train": len(splits.train), "test": 8}


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _first(data: dict, key: str) -> dict:
    return data[key][2]


MALFORMED = {
    "not JSON": (lambda root: (root / TRAIN_JSON).write_text('{"images": ['), lambda d: ["not a readable JSON"]),
    "no images": (lambda data: data.pop("images"), lambda d: ["'images' is missing"]),
    "bbox of 3": (lambda data: _first(data, "annotations").update(bbox=[1.0, 2.0, 3.0]),
                  lambda d: [f"annotation id {_first(d, 'annotations')['id']} ", "bbox [1.0, 2.0, 3.0]"]),
    "bbox not numbers": (lambda data: _first(data, "annotations").update(bbox=["1", 2, 3, 4]),
                         lambda d: [f"annotation id {_first(d, 'annotations')['id']} ", "not 4 finite numbers"]),
    "negative size": (lambda data: _first(data, "annotations")["bbox"].__setitem__(3, -4.0),
                      lambda d: [f"annotation id {_first(d, 'annotations')['id']} ", "negative width or height"]),
    "unknown category": (lambda data: _first(data, "annotations").update(category_id=2),
                         lambda d: [f"annotation id {_first(d, 'annotations')['id']} ",
                                    "category_id 2 is not in categories"]),
    "unknown image": (lambda data: _first(data, "annotations").update(image_id=123456789),
                      lambda d: [f"annotation id {_first(d, 'annotations')['id']} ",
                                 "image_id 123456789 is not an image"]),
    "image not on disk": (lambda root: (root / "train2017" / _first(json.loads((root / TRAIN_JSON).read_text()),
                                                                     "images")["file_name"]).unlink(),
                          lambda d: [f"image id {_first(d, 'images')['id']} ", _first(d, "images")["file_name"],
                                     "is missing"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_annotation_file_is_refused_by_file_and_entry(layout, case):
    change, expected = MALFORMED[case]
    original = json.loads((layout / TRAIN_JSON).read_text())
    if case in ("not JSON", "image not on disk"):
        change(layout)
    else:
        _rewrite(layout / TRAIN_JSON, change)
    with pytest.raises(DatasetError) as e:
        family.prepare(_cfg(layout))
    message = str(e.value)
    assert str(layout / TRAIN_JSON) in message
    for part in expected(original):
        assert part in message, message
    assert not (layout / family.PREPARED).exists()  # nothing half-read is recorded as prepared


def test_the_training_call_checks_again(layout):
    first = family.prepare(_cfg(layout))
    assert first["name"] == "coco" and first["identity"].startswith("coco layout sha256:")
    assert family.prepare(_cfg(layout))["identity"] == first["identity"]  # stable across prepares
    assert family.load_splits(_cfg(layout), RECIPE).identity == first["identity"]
    data = json.loads((layout / VAL_JSON).read_text())
    (layout / "val2017" / data["images"][1]["file_name"]).unlink()
    with pytest.raises(DatasetError, match=f"image id {data['images'][1]['id']} .*val2017.*is missing"):
        family.load_splits(_cfg(layout), RECIPE)
    with open(layout / TRAIN_JSON, "a") as f:
        f.write(" ")
    with pytest.raises(DatasetError, match="instances_train2017.json: changed since the data stage"):
        family.load_splits(_cfg(layout), RECIPE)


def test_without_data_the_message_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetError, match=f"COCO not found at {tmp_path}: put the official zips there "
                                           r"\(train2017.zip, val2017.zip, annotations_trainval2017.zip\)"):
        family.prepare(_cfg(tmp_path))
    with pytest.raises(DatasetError, match="is not prepared"):
        family.load_splits(_cfg(tmp_path), RECIPE)


ZIP_ARGS = {"seed": 0, "train_images": 8, "val_images": 8, "image_size": (48, 64), "categories": 3}


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every extracted file with its inode and mtime: any rewrite changes one."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for folder in family.ARCHIVES.values() for p in (root / folder).rglob("*")}


@pytest.fixture
def extractions(monkeypatch) -> list[str]:
    """The zips extracted, by name, in order."""
    seen: list[str] = []
    original = zipfile.ZipFile.extractall

    def counted(self, *args, **kwargs):
        seen.append(Path(self.filename).name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "extractall", counted)
    return seen


def test_the_zips_are_extracted_once(tmp_path, extractions):
    root = tmp_path / "coco"
    md5s = write_synthetic_coco_zips(root, **ZIP_ARGS)
    identity = "coco archives md5:" + ",".join(md5s[n] for n in family.ARCHIVES)
    out = family.prepare(_cfg(root))
    assert out == {"name": "coco", "family": "coco", "root": str(root), "identity": identity, "synthetic": False,
                   "num_classes": 8, "train": out["train"], "test": 8}
    assert extractions == list(family.ARCHIVES) and 4 <= out["train"] < 8
    assert len(list((root / "train2017").glob("*.jpg"))) == 8 and not list(root.glob(".*.tskd-extracting"))
    before = _files(root)
    assert family.prepare(_cfg(root))["identity"] == identity
    assert extractions == list(family.ARCHIVES) and _files(root) == before  # nothing extracted again
    splits = family.load_splits(_cfg(root), RECIPE)
    assert splits.identity == identity and splits.name == "coco" and len(splits.test) == 8
    # The zips removed after extraction (19 GB): still the same data, the same identity.
    for name in family.ARCHIVES:
        (root / name).rename(tmp_path / name)
    assert family.prepare(_cfg(root))["identity"] == identity and _files(root) == before
    # New zips (other content): the folders tskd extracted from the old ones are extracted again.
    write_synthetic_coco_zips(root, **ZIP_ARGS | {"seed": 1})
    assert family.prepare(_cfg(root))["identity"] != identity
    assert extractions == list(family.ARCHIVES) * 2
    assert len(family.load_splits(_cfg(root), RECIPE).test) == 8


def test_an_interrupted_extraction_is_redone(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    md5s = write_synthetic_coco_zips(root, **ZIP_ARGS)
    original = zipfile.ZipFile.extractall

    def interrupted(self, path=None, members=None, pwd=None):
        if Path(self.filename).name != "train2017.zip":
            return original(self, path, members, pwd)
        for member in self.namelist()[:3]:
            self.extract(member, path)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "extractall", interrupted)
        with pytest.raises(KeyboardInterrupt):
            family.prepare(_cfg(root))
    assert (root / ".train2017.tskd-extracting").exists() and not (root / family.PREPARED).exists()
    assert len(list((root / "train2017").iterdir())) == 2
    (root / "train2017" / "left-over.jpg").write_bytes(b"partial")
    out = family.prepare(_cfg(root))
    assert out["identity"] == "coco archives md5:" + ",".join(md5s[n] for n in family.ARCHIVES)
    assert sorted(p.name for p in (root / "train2017").iterdir()) == sorted(
        im["file_name"] for im in json.loads((root / TRAIN_JSON).read_text())["images"])
    assert not (root / ".train2017.tskd-extracting").exists()


def test_a_damaged_zip_is_named(tmp_path):
    root = tmp_path / "coco"
    write_synthetic_coco_zips(root, **ZIP_ARGS)
    data = (root / "val2017.zip").read_bytes()
    (root / "val2017.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{root / 'val2017.zip'}: cannot extract it"):
        family.prepare(_cfg(root))
    assert not (root / family.PREPARED).exists()
