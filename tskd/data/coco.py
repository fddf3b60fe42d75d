"""COCO 2017 detection through torchvision's real reader: the dataset family ``coco``.

Users hold, in ``dataset.root``, the three official zips (``train2017.zip``, ``val2017.zip``,
``annotations_trainval2017.zip``) or their extracted layout (``train2017/``, ``val2017/``,
``annotations/instances_{train,val}2017.json``). The data stage (``prepare``) extracts whatever is
missing, once, checks both annotation files entry by entry against the images on disk, and only
then records what it prepared in ``tskd_prepared.json``. The identity of the data is the md5s of
the three zips (or, for a layout given without them, the annotation files' sha256s and a
fingerprint of the image trees). DVC versions the zips, not the extracted folders: hashing 123 k
image files on every ``dvc status`` is slow, three files are quick (the same reason as ImageNet's
archives). A training call re-checks the annotations it has parsed anyway and the image names on
disk, and reads the identity from the record; it hashes nothing large.

Data tskd writes itself (``synthetic``: ``tskd.data.synthetic_coco``, the layout directly) is
verified by its manifest instead.

Reading: torchvision's ``CocoDetection`` wrapped by ``wrap_dataset_for_transforms_v2`` (boxes as
XYXY ``BoundingBoxes``, labels = COCO category ids), transforms v2: training ``ToImage``, a
horizontal flip if the recipe's ``augment`` has ``flip``, ``ToDtype(float32, scale=True)``;
evaluation the same without the flip. No resize or normalisation here: torchvision's detectors do
both in ``model.transform`` (``dataset.min_size`` / ``max_size``).

Labels are COCO's raw category ids, as torchvision's detection models and their COCO_V1 weights
(91 classes, ids 1..90 with gaps) have them: ``num_classes`` = max category id + 1 and
``classes[id]`` the category's name ("__background__" at 0, "" for ids COCO does not use).

Items are ``(image, target, index)``: ``image`` a float32 CHW tensor in [0, 1] of the image's own
size; ``target`` ``{"boxes": float32 N x 4 XYXY pixels, "labels": int64 N, "image_id": int}``;
``index`` the item's position in its split. A training split skips images without annotations and
drops crowd (``iscrowd`` 1) and degenerate boxes (width or height at most 1 px inside the image)
from targets, as torchvision's reference (``references/detection/coco_utils.py``) does; an image
left with no box is skipped too. The evaluation split keeps every image; its targets drop the same
boxes (so that they are valid training targets, e.g. for a loss), and its ``.coco`` (pycocotools,
every annotation, crowds included) is what ``COCOeval`` scores against. ``collate`` batches items as
lists (images differ in size).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from tskd.data.integrity import MANIFEST_NAME, DatasetError, sha256_file, verify_manifest
from tskd.data.splits import IndexedSplit, Splits
from tskd.data.synthetic_coco import write_synthetic_coco
from tskd.io import atomic_write_json

PREPARED = "tskd_prepared.json"
# Each official zip and the one folder it extracts to.
ARCHIVES = {"train2017.zip": "train2017", "val2017.zip": "val2017", "annotations_trainval2017.zip": "annotations"}
SPLITS = ("train", "test")  # test = val2017: the set every COCO paper reports on
IMAGE_DIRS = {"train": "train2017", "test": "val2017"}
ANNOTATIONS = {"train": "annotations/instances_train2017.json", "test": "annotations/instances_val2017.json"}
BACKGROUND = "__background__"
_CHUNK = 1 << 20


# -- annotation checks ---------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def read_annotations(path: Path) -> dict[str, Any]:
    """The parsed instances file; a DatasetError naming it when it cannot be read as JSON."""
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable JSON file ({type(e).__name__}: {e})") from None


def check_annotations(path: Path, data: Any, image_dir: Path) -> dict[str, Any]:
    """Check a COCO instances file entry by entry; return ``{"categories": {id: name}, "images": n,
    "annotations": n}``.

    Refused (DatasetError naming ``path`` and the entry): not a JSON object with ``images``,
    ``annotations`` and ``categories`` lists; an entry without a valid id (ids: positive integers,
    unique; category 0 is the background); an image without a file name or positive width and height,
    or whose file is not in ``image_dir``; an annotation whose ``image_id`` is not an image of the file,
    whose ``category_id`` is not a category, whose ``bbox`` is not 4 finite numbers or has a negative
    width or height, or whose ``iscrowd`` is not 0 or 1. pycocotools and torchvision check none of
    this; each would surface mid-training, or as silently wrong labels.
    """
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (a JSON object with images, annotations and "
                           f"categories), but a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            got = "missing" if key not in data else f"a {type(data[key]).__name__}, not a list"
            raise DatasetError(f"{path}: {key!r} is {got}; a COCO instances file has images, annotations and "
                               "categories lists")

    def entry_id(kind: str, i: int, entry: Any, seen: dict | set) -> int:
        eid = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not _is_int(eid) or eid < (1 if kind == "categories" else 0):
            valid = "a positive integer: 0 is the background" if kind == "categories" else "an integer"
            raise DatasetError(f"{path}: {kind}[{i}]: id {eid!r} is not a valid id ({valid})")
        if eid in seen:
            raise DatasetError(f"{path}: {kind}[{i}]: id {eid} is listed twice")
        return eid

    categories: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        cid = entry_id("categories", i, c, categories)
        if not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: category id {cid} (categories[{i}]): name {c.get('name')!r} is not a string")
        categories[cid] = c["name"]
    try:
        on_disk = set(os.listdir(image_dir))
    except OSError as e:
        raise DatasetError(f"{image_dir}: cannot list the images of {path} ({e})") from None
    images: set[int] = set()
    for i, im in enumerate(data["images"]):
        iid = entry_id("images", i, im, images)
        where = f"{path}: image id {iid} (images[{i}])"
        name = im.get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{where}: file_name {name!r} is not a file name")
        for key in ("width", "height"):
            if not _is_int(im.get(key)) or im[key] <= 0:
                raise DatasetError(f"{where}: {key} {im.get(key)!r} is not a positive integer")
        # A name with a folder in it is looked up directly; plain names (COCO's) against one listing.
        if name not in on_disk and not ("/" in name and (image_dir / name).is_file()):
            raise DatasetError(f"{where}: its file {image_dir / name} is missing")
        images.add(iid)
    seen: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        aid = entry_id("annotations", i, a, seen)
        seen.add(aid)
        where = f"{path}: annotation id {aid} (annotations[{i}])"
        if not _is_int(a.get("image_id")) or a["image_id"] not in images:
            raise DatasetError(f"{where}: image_id {a.get('image_id')!r} is not an image of this file")
        if not _is_int(a.get("category_id")) or a["category_id"] not in categories:
            raise DatasetError(f"{where}: category_id {a.get('category_id')!r} is not in categories "
                               f"(ids {', '.join(map(str, sorted(categories)))})")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, width, height]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{where}: bbox {bbox!r} has a negative width or height")
        if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), float):
            raise DatasetError(f"{where}: iscrowd {a.get('iscrowd')!r} is not 0 or 1")
    return {"categories": categories, "images": len(images), "annotations": len(seen)}


def _same_categories(root: Path, found: dict[str, dict[str, Any]]) -> dict[int, str]:
    """The categories, the same in both files (a label means one thing in training and scoring)."""
    train, test = found["train"]["categories"], found["test"]["categories"]
    if train != test:
        differ = sorted(k for k in set(train) | set(test) if train.get(k) != test.get(k))
        raise DatasetError(f"{root / ANNOTATIONS['train']} and {root / ANNOTATIONS['test']} list different "
                           f"categories (ids {', '.join(map(str, differ[:8]))}{' ...' if len(differ) > 8 else ''})")
    if not train:
        raise DatasetError(f"{root / ANNOTATIONS['train']}: no categories")
    return train


def class_names(categories: dict[int, str]) -> tuple[str, ...]:
    """Names indexed by label (COCO category id): "__background__" at 0, "" for ids not in use."""
    names = [""] * (max(categories) + 1)
    names[0] = BACKGROUND
    for cid, name in categories.items():
        names[cid] = name
    return tuple(names)


def kept_boxes(annotations: list[dict[str, Any]], width: int, height: int) -> np.ndarray:
    """Which annotations are training boxes: not crowd and, clamped to the image, wider and higher than 1 px
    (torchvision's reference drops crowds, and images whose every box is that small)."""
    keep = np.zeros(len(annotations), dtype=bool)
    for k, a in enumerate(annotations):
        x, y, w, h = a["bbox"]
        # The size less what lies outside the image, not min(x + w, width) - max(x, 0): for a box inside
        # the image that is its width exactly (1.36 + 1.0 - 1.36 is 1.0000000000000002 > 1).
        inside_w = w - max(0, -x) - max(0, x + w - width)
        inside_h = h - max(0, -y) - max(0, y + h - height)
        keep[k] = not a.get("iscrowd", 0) and inside_w > 1 and inside_h > 1
    return keep


# -- the data stage ------------------------------------------------------------------------------------------

def _layout_problem(root: Path) -> str | None:
    """What is missing of the extracted layout, or None."""
    need = [*IMAGE_DIRS.values(), *ANNOTATIONS.values()]
    missing = [str(root / p) for p in need if not (root / p).exists()]
    return f"missing {', '.join(missing)}" if missing else None


def _marker(root: Path, folder: str) -> Path:
    return root / f".{folder}.tskd-extracting"


def _earlier_record(root: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((root / PREPARED).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _archive_md5s(root: Path, earlier: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each zip's md5, size and mtime. A zip of the size and mtime the record has is not read again
    (DVC's and make's test of a changed file): train2017.zip is 19 GB."""
    cached = (earlier or {}).get("archives") or {}
    out = {}
    for name in ARCHIVES:
        st = (root / name).stat()
        was = cached.get(name) or {}
        same = was.get("size") == st.st_size and was.get("mtime_ns") == st.st_mtime_ns and was.get("md5")
        out[name] = {"md5": was["md5"] if same else _md5(root / name), "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns}
    return out


def _extract(archive: Path, root: Path, folder: str) -> None:
    """Extract ``archive``, whose members must all lie in ``folder/``, into ``root``."""
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                parts = PurePosixPath(member).parts
                if not parts or parts[0] != folder or ".." in parts:
                    raise DatasetError(f"{archive}: member {member!r} is not in {folder}/; not the official "
                                       f"archive (it extracts to {folder}/ only)")
            z.extractall(root)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:  # also a member failing its CRC
        raise DatasetError(f"{archive}: cannot extract it ({type(e).__name__}: {e}); download it again") from None
    except OSError as e:  # the zip is fine, the disk is not (full, read-only)
        raise DatasetError(f"{archive}: cannot extract it into {root} ({e})") from None


def _prepare_archives(root: Path, archives: dict[str, dict[str, Any]], earlier: dict[str, Any] | None
                      ) -> dict[str, str]:
    """Extract each zip whose folder is missing, unfinished, or was extracted by tskd from another version
    of the zip; return the md5 of the zip each folder now comes from.

    A folder is extracted under a marker, removed once the folder is complete: a folder with a marker
    (an interrupted extraction) is removed and extracted again. A folder that was there before (the user
    extracted it) is taken as it is, as torchvision takes ImageNet's.
    """
    extracted_from = (earlier or {}).get("extracted") or {}
    for name, folder in ARCHIVES.items():
        target, marker, md5 = root / folder, _marker(root, folder), archives[name]["md5"]
        if marker.exists():
            shutil.rmtree(target, ignore_errors=True)
        elif target.is_dir():
            if extracted_from.get(folder, md5) == md5:
                continue
            shutil.rmtree(target)  # tskd extracted it from an earlier version of this zip
        marker.touch()
        _extract(root / name, root, folder)
        marker.unlink()
    return {folder: archives[name]["md5"] for name, folder in ARCHIVES.items()}


def _tree_fingerprint(root: Path) -> str:
    """Names and sizes of every image: a once-per-preparation identity for a layout without zips."""
    h = hashlib.sha256()
    for folder in IMAGE_DIRS.values():
        for entry in sorted(os.scandir(root / folder), key=lambda e: e.name):
            h.update(f"{folder}/{entry.name} {entry.stat().st_size}\n".encode())
    return h.hexdigest()


def _refuse_val_fraction(cfg) -> None:
    if cfg.val_fraction > 0:  # CocoData refuses it too; a hand-built cfg may not have been validated
        raise DatasetError(f"dataset.val_fraction {cfg.val_fraction}: coco holds no validation split out of "
                           "train2017 (models are evaluated on val2017); set it to 0")


def prepare(cfg) -> dict[str, Any]:
    """The data stage: write the synthetic set, or extract (once) and check the real one; the record is
    written only once every check has passed."""
    _refuse_val_fraction(cfg)
    root = Path(cfg.root).expanduser()
    if cfg.synthetic is not None:
        s = cfg.synthetic
        write_synthetic_coco(root, seed=s.seed, train_images=s.train_images, val_images=s.val_images,
                             image_size=(s.min_image_size, s.max_image_size), categories=s.categories)
    earlier = _earlier_record(root)
    extracted: dict[str, str] = {}
    archives: dict[str, dict[str, Any]] = {}
    if (root / MANIFEST_NAME).is_file():
        verify_manifest(root, required=tuple(ANNOTATIONS.values()))
        how, identity = "manifest", f"coco manifest sha256:{sha256_file(root / MANIFEST_NAME)}"
    elif all((root / name).is_file() for name in ARCHIVES):
        archives = _archive_md5s(root, earlier)
        extracted = _prepare_archives(root, archives, earlier)
        how = "archives md5"
        identity = "coco archives md5:" + ",".join(archives[name]["md5"] for name in ARCHIVES)
    elif _layout_problem(root) is None:
        unfinished = [str(root / f) for f in ARCHIVES.values() if _marker(root, f).exists()]
        if unfinished:
            raise DatasetError(f"{', '.join(unfinished)}: its extraction from the zips was interrupted and the "
                               f"zips are no longer in {root}; put them back to extract it again")
        how, identity = "prepared layout", None  # the identity needs the annotation hashes, below
    else:
        raise DatasetError(f"COCO not found at {root}: put the official zips there ({', '.join(ARCHIVES)}) or "
                           f"their extracted layout (train2017/, val2017/, {ANNOTATIONS['train']}, "
                           f"{ANNOTATIONS['test']}); {_layout_problem(root)}")
    found, counts, hashes = {}, {}, {}
    for split in SPLITS:
        path = root / ANNOTATIONS[split]
        data = read_annotations(path)
        found[split] = check_annotations(path, data, root / IMAGE_DIRS[split])
        hashes[split] = sha256_file(path)
        counts[split] = _count_items(data, split)
    categories = _same_categories(root, found)
    if identity is None:
        was = earlier or {}
        if was.get("verified_by") == "archives md5" and was.get("annotations") and all(
                was["annotations"].get(s, {}).get("sha256") == hashes[s] for s in SPLITS):
            # Extracted from the zips, which were then removed (19 GB): the same data, so the same identity;
            # re-keying every run on the tree would retrain them all.
            how, identity, extracted = was["verified_by"], was["identity"], was.get("extracted", {})
        else:
            tree = hashlib.sha256(f"{hashes['train']} {hashes['test']} {_tree_fingerprint(root)}".encode())
            identity = f"coco layout sha256:{tree.hexdigest()}"
    record = {"identity": identity, "verified_by": how, "num_classes": max(categories) + 1,
              "categories": {str(k): v for k, v in sorted(categories.items())},
              "annotations": {s: {"file": ANNOTATIONS[s], "sha256": hashes[s],
                                  "size": (root / ANNOTATIONS[s]).stat().st_size, "images": found[s]["images"],
                                  "annotations": found[s]["annotations"]} for s in SPLITS},
              "items": counts, "archives": archives, "extracted": extracted}
    atomic_write_json(root / PREPARED, record)
    return {"name": _name(how), "family": cfg.name, "root": str(root), "identity": identity,
            "synthetic": cfg.synthetic is not None, "num_classes": max(categories) + 1,
            "train": counts["train"], "test": counts["test"]}


def _count_items(data: dict[str, Any], split: str) -> int:
    """How many items a split has: every image for evaluation, those with a training box for training."""
    if split != "train":
        return len(data["images"])
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    return sum(bool(kept_boxes(by_image.get(im["id"], []), im["width"], im["height"]).any())
               for im in data["images"])


def _name(verified_by: str) -> str:
    return "synthetic-coco" if verified_by == "manifest" else "coco"


def versioned_inputs(cfg) -> list[str]:
    """What DVC versions of the real data: the three zips, never the extracted folders."""
    return [str(Path(cfg.root) / name) for name in ARCHIVES]


# -- reading -------------------------------------------------------------------------------------------------

def train_transform(augment: tuple[str, ...]) -> v2.Compose:
    flip = [v2.RandomHorizontalFlip()] if "flip" in augment else []
    return v2.Compose([v2.ToImage(), *flip, v2.ToDtype(torch.float32, scale=True)])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


class CocoSplit(IndexedSplit):
    """Images of a COCO reader as items ``(image, target, index)`` (see the module docstring).

    An ``IndexedSplit`` for the loaders: asked for as ``(index, draw_seed)``, an item draws its flip
    from (draw_seed, index) alone, so a resumed epoch and any number of workers give the same flips.
    ``labels`` is None: an image has no single label (what CRD's class-aware negatives would need).
    ``coco`` is the pycocotools ``COCO`` of the annotation file (every annotation: what ``COCOeval``
    scores against); ``image_ids[index]`` is the COCO image id of an item.
    """

    def __init__(self, reader: Any, rows: np.ndarray, keep: list[np.ndarray], transform: Any,
                 classes: tuple[str, ...]) -> None:
        base = reader._dataset  # the CocoDetection inside torchvision's v2 wrapper
        self.source = reader
        self.rows = np.asarray(rows, dtype=np.int64)
        self.keep = [keep[r] for r in self.rows]
        self.transform = transform
        self.labels = None
        self.classes = list(classes)
        self.coco = base.coco
        self.root = base.root
        self.image_ids: list[int] = [int(base.ids[r]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def aspect_ratios(self) -> list[float]:
        """Each item's width / height as the annotation file records it (batch grouping; no image is read)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.image_ids]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any], int]:
        index, draw_seed = key if isinstance(key, tuple) else (key, None)
        image, raw = self.source[int(self.rows[index])]
        image, target = self._transformed((image, self._target(image, raw, int(index))), index, draw_seed)
        # Plain tensors out: tv_tensors' subclasses are for the transforms; the trainer, pin_memory and
        # the model need none of their metadata.
        return (image.as_subclass(torch.Tensor),
                {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                 "image_id": target["image_id"]}, int(index))

    def _target(self, image: Any, raw: dict[str, Any], index: int) -> dict[str, Any]:
        """The wrapper's target with crowd and degenerate boxes dropped and boxes clamped to the image."""
        height, width = v2.functional.get_size(image)
        keep = torch.from_numpy(self.keep[index])
        if "boxes" in raw:
            boxes = raw["boxes"].as_subclass(torch.Tensor).to(torch.float32)
            if len(boxes) != len(keep):  # the annotation file changed under a running reader
                raise DatasetError(f"{self.root}: image id {raw['image_id']} has {len(boxes)} annotations now, "
                                   f"{len(keep)} when the split was built")
            boxes = boxes[keep]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            labels = raw["labels"][keep].to(torch.int64)
        else:  # the wrapper's target for an image without annotations: its id only
            boxes, labels = torch.zeros((0, 4), dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
        return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                "labels": labels, "image_id": int(raw["image_id"])}


def collate(batch: list[tuple[torch.Tensor, dict[str, Any], int]]
            ) -> tuple[list[torch.Tensor], list[dict[str, Any]], torch.Tensor]:
    """A batch of items as (list of images, list of targets, int64 tensor of indices): images differ in size,
    and torchvision's detectors take lists (their ``model.transform`` resizes and batches them)."""
    images, targets, indices = zip(*batch, strict=True)
    return list(images), list(targets), torch.tensor(indices, dtype=torch.int64)


def model_kwargs(cfg) -> dict[str, Any]:
    """What the family's models are built with: the sizes their transform resizes images to."""
    return {"min_size": cfg.min_size, "max_size": cfg.max_size}


def _record(root: Path) -> dict[str, Any]:
    problem = _layout_problem(root)
    if problem or not (root / PREPARED).is_file():
        raise DatasetError(f"COCO at {root} is not prepared ({problem or f'no {root / PREPARED}'}): run the data "
                           "stage first (snakemake, or `tskd data prepare`), which extracts the zips once and "
                           "checks the annotations")
    record = _earlier_record(root)
    if record is None or not isinstance(record.get("annotations"), dict):
        raise DatasetError(f"{root / PREPARED}: unreadable; run the data stage again")
    return record


def _reader(root: Path, split: str) -> Any:
    """torchvision's CocoDetection of one split in its v2 wrapper; a file pycocotools cannot index is
    refused by name (and by entry, where the checks can tell)."""
    from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

    path, image_dir = root / ANNOTATIONS[split], root / IMAGE_DIRS[split]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            base = CocoDetection(str(image_dir), str(path))
    except Exception as e:  # pycocotools: a bare KeyError or assertion for a malformed file
        check_annotations(path, read_annotations(path), image_dir)
        raise DatasetError(f"{path}: pycocotools cannot read it ({type(e).__name__}: {e})") from None
    return wrap_dataset_for_transforms_v2(base)


def load_splits(cfg, recipe) -> Splits:
    """torchvision's COCO reader on the prepared layout; the identity from the data stage's record."""
    _refuse_val_fraction(cfg)
    root = Path(cfg.root).expanduser()
    record = _record(root)
    readers, found = {}, {}
    for split in SPLITS:
        path = root / ANNOTATIONS[split]
        was = record["annotations"].get(split) or {}
        if path.stat().st_size != was.get("size"):
            raise DatasetError(f"{path}: changed since the data stage checked it ({root / PREPARED}); prepare "
                               "the data again")
        readers[split] = _reader(root, split)
        coco = readers[split]._dataset.coco
        # The checks again, on what pycocotools has parsed anyway: linear in the entries, no image opened.
        found[split] = check_annotations(path, coco.dataset, root / IMAGE_DIRS[split])
        if (found[split]["images"], found[split]["annotations"]) != (was.get("images"), was.get("annotations")):
            raise DatasetError(f"{path}: {found[split]['images']} images and {found[split]['annotations']} "
                               f"annotations now, {was.get('images')} and {was.get('annotations')} when it was "
                               f"prepared ({root / PREPARED}); prepare the data again")
    categories = _same_categories(root, found)
    classes = class_names(categories)
    splits = {}
    for split in SPLITS:
        base = readers[split]._dataset
        # pycocotools' imgToAnns holds an image's annotations in the order CocoDetection returns them.
        keep = [kept_boxes(base.coco.imgToAnns.get(i, []), base.coco.imgs[i]["width"], base.coco.imgs[i]["height"])
                for i in base.ids]
        rows = (np.flatnonzero([k.any() for k in keep]) if split == "train" else np.arange(len(base.ids)))
        if len(rows) == 0:
            raise DatasetError(f"{root / ANNOTATIONS[split]}: no image with a training box (every annotation is "
                               "crowd or degenerate)" if split == "train" else f"{root / ANNOTATIONS[split]}: no image")
        tf = train_transform(recipe.augment) if split == "train" else eval_transform()
        splits[split] = CocoSplit(readers[split], rows, keep, tf, classes)
    return Splits(train=splits["train"], val=None, test=splits["test"], classes=classes,
                  verified_by=record["verified_by"], identity=record["identity"], name=_name(record["verified_by"]),
                  image_size=(cfg.min_size, cfg.max_size), collate=collate)
