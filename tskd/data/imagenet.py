"""ImageNet (ILSVRC2012) through torchvision's real reader: the dataset family ``imagenet``.

Users hold the official archives (``ILSVRC2012_img_train.tar``, ``ILSVRC2012_img_val.tar``,
``ILSVRC2012_devkit_t12.tar.gz``) in ``dataset.root``. The data stage (``prepare``) has
torchvision turn them, once, into its layout (``train/<wnid>/``, ``val/<wnid>/``, ``meta.bin``),
checking each archive against its official md5, and records what it prepared in
``tskd_prepared.json``: the archives' md5s are the data's identity. A training call never hashes
the 1.28 M extracted files: it checks the layout (both splits, the same classes as meta.bin)
and reads the identity from that record. DVC versions the three archives, not the tree.

Data tskd writes itself (``synthetic``, the prepared layout directly) is verified by its
manifest instead, as for CIFAR-100.

Transforms (mdistiller's / torchvision's ImageNet recipe): training ``RandomResizedCrop(crop)``
and a horizontal flip (``augment`` parts ``crop``, ``flip``); evaluation ``Resize(resize)`` and
``CenterCrop(crop)``; then the recipe's normalisation (``imagenet``: torchvision's statistics).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torchvision import transforms as T
from torchvision.datasets import ImageNet
from torchvision.datasets.imagenet import ARCHIVE_META

from tskd.data.integrity import MANIFEST_NAME, DatasetError, sha256_file, verify_manifest
from tskd.data.splits import NORMALIZATION, IndexedSplit, Splits, split_train
from tskd.data.synthetic_imagenet import write_synthetic_imagenet
from tskd.io import atomic_write_json

META_FILE = "meta.bin"
PREPARED = "tskd_prepared.json"
ARCHIVES = {split: name for split, (name, _) in ARCHIVE_META.items()}  # train, val, devkit
SPLITS = ("train", "val")


def _layout_problem(root: Path) -> str | None:
    """What is missing for torchvision's prepared layout, or None."""
    missing = [str(root / p) for p in (META_FILE, *SPLITS) if not (root / p).exists()]
    return f"missing {', '.join(missing)}" if missing else None


def _check_classes(root: Path) -> list[str]:
    """The wnids, sorted; the same in train/, val/ and meta.bin, else a DatasetError naming both."""
    import torch

    found = {s: sorted(d.name for d in os.scandir(root / s) if d.is_dir()) for s in SPLITS}
    try:
        wnid_to_classes, _ = torch.load(root / META_FILE, weights_only=True)
    except Exception as e:
        raise DatasetError(f"{root / META_FILE}: cannot read ({type(e).__name__}: {e}); delete it and prepare "
                           "the data again from the archives") from None
    if found["train"] != found["val"]:
        only = sorted(set(found["train"]) ^ set(found["val"]))
        raise DatasetError(f"{root / 'train'} and {root / 'val'} hold different classes ({len(found['train'])} vs "
                           f"{len(found['val'])} wnid folders; in one only: {', '.join(only[:5])}"
                           f"{' ...' if len(only) > 5 else ''})")
    if not found["train"]:
        raise DatasetError(f"{root / 'train'}: no class (wnid) folders")
    unknown = sorted(set(found["train"]) - set(wnid_to_classes))
    if unknown:
        raise DatasetError(f"{root / 'train'}: wnid folders that {root / META_FILE} does not list: "
                           f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return found["train"]


def _tree_fingerprint(root: Path) -> str:
    """Paths and sizes of every image: a once-per-preparation identity for a layout without archives."""
    h = hashlib.sha256()
    for split in SPLITS:
        for dirpath, dirnames, filenames in os.walk(root / split):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                h.update(f"{path.relative_to(root)} {path.stat().st_size}\n".encode())
    return h.hexdigest()


def prepare(cfg) -> dict[str, Any]:
    """The data stage: write the synthetic set, or prepare (once) and check the real one."""
    root = Path(cfg.root)
    if cfg.synthetic is not None:
        s = cfg.synthetic
        write_synthetic_imagenet(root, seed=s.seed, classes=s.classes, train_per_class=s.train_per_class,
                                 val_per_class=s.val_per_class, image_size=s.image_size)
    if (root / MANIFEST_NAME).is_file():
        verify_manifest(root, required=(META_FILE,))
        how, identity = "manifest", f"imagenet manifest sha256:{sha256_file(root / MANIFEST_NAME)}"
    elif all((root / a).is_file() for a in ARCHIVES.values()):
        _prepare_archives(root)
        how = "official md5"
        identity = "imagenet official archives md5:" + ",".join(md5 for _, md5 in ARCHIVE_META.values())
    elif _layout_problem(root) is None:
        unfinished = [str(root / split) for split in SPLITS if _marker(root, split).exists()]
        if unfinished:
            raise DatasetError(f"{', '.join(unfinished)}: its extraction from the archives was interrupted and "
                               f"the archives are no longer in {root}; put them back to extract it again")
        earlier = _earlier_record(root)
        if earlier and earlier.get("verified_by") == "official md5":
            # Prepared from the official archives, which were then removed (150 GB): still the same data,
            # so the same identity; re-keying every run on the tree would retrain them all.
            how, identity = earlier["verified_by"], earlier["identity"]
        else:
            how, identity = "prepared layout", f"imagenet tree sha256:{_tree_fingerprint(root)}"
    else:
        raise DatasetError(f"ImageNet not found at {root}: put the official archives there "
                           f"({', '.join(ARCHIVES.values())}) or torchvision's prepared layout (train/, val/, "
                           f"{META_FILE}); {_layout_problem(root)}")
    wnids = _check_classes(root)
    counts = {s: sum(len(os.listdir(root / s / w)) for w in wnids) for s in SPLITS}
    record = {"identity": identity, "verified_by": how, "classes": len(wnids), **counts}
    atomic_write_json(root / PREPARED, record)
    return {"name": _name(how), "family": cfg.name, "root": str(root), "identity": identity,
            "synthetic": cfg.synthetic is not None, "num_classes": len(wnids), "train": counts["train"],
            "test": counts["val"]}


def _marker(root: Path, split: str) -> Path:
    return root / f".{split}.tskd-extracting"


def _earlier_record(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / PREPARED).read_text())
    except (OSError, ValueError):
        return None


def _prepare_archives(root: Path) -> None:
    """torchvision's own preparation of whatever split is not prepared yet (md5-checked, once).

    A split folder is extracted under a marker, removed once it is complete: torchvision takes any
    existing folder as prepared, so one left by an interrupted extraction is removed and extracted again.
    """
    for split in SPLITS:
        marker = _marker(root, split)
        if marker.exists():
            shutil.rmtree(root / split, ignore_errors=True)
        elif (root / split).is_dir() and (root / META_FILE).is_file():
            continue
        if not (root / split).exists():  # torchvision extracts it; never a folder tskd did not start
            marker.touch()
        try:
            ImageNet(str(root), split=split)
        except RuntimeError as e:  # torchvision's message: the archive is missing or corrupted
            if not (root / split).exists():  # refused before extracting
                marker.unlink(missing_ok=True)
            named = [str(root / name) for name in ARCHIVES.values() if name in str(e)]
            raise DatasetError(f"{', '.join(named) or root}: preparing the {split} split from the archives "
                               f"failed: {e}") from None
        marker.unlink(missing_ok=True)


def _name(verified_by: str) -> str:
    return "synthetic-imagenet" if verified_by == "manifest" else "imagenet"


def versioned_inputs(cfg) -> list[str]:
    """What DVC versions of the real data: the three archives, never the extracted tree."""
    return [str(Path(cfg.root) / name) for name in ARCHIVES.values()]


def _record(root: Path) -> dict[str, Any]:
    problem = _layout_problem(root)
    if problem or not (root / PREPARED).is_file():
        raise DatasetError(f"ImageNet at {root} is not prepared ({problem or f'no {root / PREPARED}'}): run the "
                           "data stage first (snakemake, or `tskd data prepare`), which prepares the archives once")
    return json.loads((root / PREPARED).read_text())


def train_transform(crop: int, resize: int, normalization: str, augment: tuple[str, ...]) -> T.Compose:
    mean, std = NORMALIZATION[normalization]
    size = [T.RandomResizedCrop(crop)] if "crop" in augment else [T.Resize(resize), T.CenterCrop(crop)]
    flip = [T.RandomHorizontalFlip()] if "flip" in augment else []
    return T.Compose([*size, *flip, T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(crop: int, resize: int, normalization: str) -> T.Compose:
    mean, std = NORMALIZATION[normalization]
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])


def load_splits(cfg, recipe) -> Splits:
    """torchvision's ImageNet reader on the prepared layout; the identity from the data stage's record."""
    root = Path(cfg.root).expanduser()
    record = _record(root)
    wnids = _check_classes(root)
    if len(wnids) != record["classes"]:
        raise DatasetError(f"{root}: {len(wnids)} classes now, {record['classes']} when it was prepared "
                           f"({root / PREPARED}); prepare it again")
    readers = {s: ImageNet(str(root), split=s) for s in SPLITS}
    eval_tf = eval_transform(cfg.crop, cfg.resize, recipe.normalization)
    train, val = split_train(readers["train"], cfg.val_fraction, 0,
                             train_transform(cfg.crop, cfg.resize, recipe.normalization, recipe.augment), eval_tf)
    name = _name(record["verified_by"])
    return Splits(train=train, val=val, test=IndexedSplit(readers["val"], None, eval_tf),
                  classes=tuple(", ".join(c) for c in readers["train"].classes), verified_by=record["verified_by"],
                  identity=record["identity"], name=name, image_size=(cfg.crop, cfg.crop))
