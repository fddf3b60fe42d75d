"""CIFAR-100 through torchvision's real reader, with the project's integrity policy.

torchvision's ``CIFAR100`` accepts only files matching the official md5 (in
``_check_integrity`` and again in ``_load_meta``), which project-written synthetic data
cannot match. ``VerifiedCIFAR100`` keeps the reader and changes only the check:

* a directory holding a ``tskd_manifest.json`` is verified against that manifest;
* any other directory must match the official md5s, as torchvision requires.

Every failure is a ``DatasetError`` (a ValueError) naming the file and how to fix it.
``cifar100_datasets`` builds the splits a run needs, with items ``(image, label, index)``.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.datasets import CIFAR100
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from tskd.data.device_loader import DeviceTrainSet
from tskd.data.integrity import (
    MANIFEST_NAME,
    DatasetError,
    IntegrityError,
    read_manifest,
    sha256_file,
    verify_manifest,
    write_manifest,
)
from tskd.data.splits import NORMALIZATION, IndexedSplit, Splits, split_train, stratified_split
from tskd.data.synthetic import Nuisance, write_synthetic_cifar100

__all__ = [
    "NORMALIZATION",
    "Splits",
    "DatasetError",
    "IndexedSplit",
    "VerifiedCIFAR100",
    "cifar100_datasets",
    "cifar100_identity",
    "eval_transform",
    "stratified_split",
    "train_batches",
    "train_images",
    "train_transform",
    "verify_cifar100_dir",
]

Normalization = str  # a name in tskd.data.splits.NORMALIZATION
NUM_CLASSES = 100
_OFFICIAL_MD5 = {name: md5 for name, md5 in CIFAR100.train_list + CIFAR100.test_list}
_OFFICIAL_MD5[CIFAR100.meta["filename"]] = CIFAR100.meta["md5"]
FILES = tuple(_OFFICIAL_MD5)  # train, test, meta
# What a corrupted or foreign pickle can raise while torchvision parses it.
_READ_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError,
                IndexError, ImportError, UnicodeDecodeError)


def _how_to_get(root: Path) -> str:
    return (f"To get it: set `download: true` in the dataset params (torchvision fetches the official "
            f"archive into {root}), or copy an extracted `{CIFAR100.base_folder}/` directory into {root}, "
            f"or write a synthetic stand-in with `tskd data synth --root {root}`.")


def verify_cifar100_dir(folder: str | Path) -> str:
    """Check a ``cifar-100-python`` directory; return how: ``"manifest"`` or ``"official md5"``.

    Raises DatasetError if files are missing, IntegrityError (a DatasetError) naming the
    first file that fails its manifest entry or, without a manifest, the official md5.
    """
    folder = Path(folder).expanduser()
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        what = "not found" if len(missing) == len(FILES) else f"incomplete (missing {', '.join(missing)})"
        raise DatasetError(f"CIFAR-100 {what} at {folder}. {_how_to_get(folder.parent)}")
    if (folder / MANIFEST_NAME).exists():
        verify_manifest(folder, required=FILES)
        return "manifest"
    for name, md5 in _OFFICIAL_MD5.items():
        if not check_integrity(str(folder / name), md5):
            raise IntegrityError(_unregistered_message(folder, name, md5))
    return "official md5"


def _unregistered_message(folder: Path, name: str, md5: str) -> str:
    """Why ``folder`` (a cifar-100-python directory) is refused when it is neither registered nor
    the official release: short lines, the facts and the register command (on a line of its own)
    first, so a terminal shows it whole; under Snakemake (``tskd --log``) it is flattened into one
    line of at most ``tskd.workflow.joblog.MAX_LINE`` characters, cut at the end, after the command."""
    root = folder.parent
    return "\n".join([
        f"{folder}: unregistered, not the official CIFAR-100",
        "Your own data in this layout? Register it once (docs/data.md)",
        f"  tskd data register {root} --name <name>",
        f"It has no {MANIFEST_NAME} (registering writes it), and its {name} does not match the",
        f"  official md5 {md5} (corrupted, if it is the official file)",
        "Or replace the directory: `download: true` re-downloads the official files",
        f"  or `tskd data synth --root {root}` writes synthetic data",
    ])


def dataset_name(folder: str | Path, verified_by: str) -> str:
    """The data's own name, for tags and reports: ``cifar100`` (official), the name it was
    registered under (``tskd data register``), or ``synthetic-cifar100`` (``tskd data synth``)."""
    if verified_by != "manifest":
        return "cifar100"
    params = (read_manifest(folder) or {}).get("params", {})
    return params.get("registered_as") or "synthetic-cifar100"


def cifar100_identity(folder: str | Path, verified_by: str) -> str:
    """What the data is, for a run's identity, without re-reading the images: the official
    release's md5s, or the sha256 of the manifest that holds every file's sha256."""
    if verified_by == "manifest":
        return f"cifar100 manifest sha256:{sha256_file(Path(folder).expanduser() / MANIFEST_NAME)}"
    return "cifar100 official md5:" + ",".join(_OFFICIAL_MD5[name] for name in FILES)


def _download(root: Path) -> None:
    """torchvision's download, unless the data is already there and intact, or was written by tskd."""
    folder = root / CIFAR100.base_folder
    if (folder / MANIFEST_NAME).exists():
        return  # project-written data is never replaced by a download; it is verified next
    try:
        verify_cifar100_dir(folder)
        return
    except DatasetError:
        pass
    try:
        download_and_extract_archive(CIFAR100.url, str(root), filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
    except (OSError, RuntimeError) as e:  # URLError is an OSError; a bad archive md5 a RuntimeError
        raise DatasetError(f"downloading {CIFAR100.url} into {root} failed ({e}). Without internet access, "
                           f"copy an extracted `{CIFAR100.base_folder}/` directory into {root}.") from e


class VerifiedCIFAR100(CIFAR100):
    """torchvision's CIFAR100 reader, verified by manifest (tskd data) or official md5 (real data)."""

    def __init__(self, root: str | Path, train: bool = True, transform: Any = None,
                 target_transform: Any = None, download: bool = False) -> None:
        root = Path(root).expanduser()
        self._folder = root / self.base_folder
        if download:
            _download(root)
        self.verified_by = verify_cifar100_dir(self._folder)
        data_file = self._folder / (self.train_list if train else self.test_list)[0][0]
        try:
            # download=False: done above; torchvision's own check then calls our _check_integrity.
            super().__init__(str(root), train=train, transform=transform, target_transform=target_transform,
                             download=False)
        except DatasetError:
            raise
        except _READ_ERRORS as e:
            raise DatasetError(f"cannot read {data_file} as a CIFAR-100 pickle ({type(e).__name__}: {e}); "
                               f"it is corrupted or truncated. {_how_to_get(root)}") from e
        labels, n = np.asarray(self.targets), len(self.classes)
        if len(labels) != len(self.data) or (len(labels) and (labels.min() < 0 or labels.max() >= n)):
            raise DatasetError(f"{data_file}: {len(self.data)} images but {len(labels)} labels, "
                               f"or labels outside 0..{n - 1} (the {n} fine_label_names of its meta)")

    def _check_integrity(self) -> bool:
        # torchvision calls this from __init__ and download(); __init__ has already verified
        # (and raised a precise error), so only a later direct call re-checks.
        if getattr(self, "verified_by", None):
            return True
        try:
            verify_cifar100_dir(self._folder)
        except DatasetError:
            return False
        return True

    def _load_meta(self) -> None:
        # torchvision's version re-checks the official md5 through the module-level
        # check_integrity, which refuses tskd data; the meta file is verified already.
        path = self._folder / self.meta["filename"]
        try:
            with open(path, "rb") as f:
                meta = pickle.load(f, encoding="latin1")
            classes = list(meta[self.meta["key"]])
        except _READ_ERRORS as e:
            raise DatasetError(f"cannot read {path} as CIFAR-100 meta ({type(e).__name__}: {e})") from e
        # The official release has 100 classes; data registered in its layout may have any number.
        if len(classes) != NUM_CLASSES and self.verified_by != "manifest":
            raise DatasetError(f"{path}: {len(classes)} fine label names, expected {NUM_CLASSES} (the official "
                               "release)")
        if len(classes) < 2:
            raise DatasetError(f"{path}: {len(classes)} fine label names; a classification dataset needs at least 2")
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}


def train_transform(normalization: Normalization, augment: tuple[str, ...] = ("crop", "flip")) -> T.Compose:
    """The ``augment`` parts (``crop``: random crop 32 with 4 px zero padding; ``flip``: horizontal
    flip, p 0.5), in that order, then ToTensor and Normalize."""
    mean, std = _stats(normalization)
    parts = {"crop": T.RandomCrop(32, padding=4), "flip": T.RandomHorizontalFlip()}
    aug = [parts[name] for name in ("crop", "flip") if name in augment]
    return T.Compose([*aug, T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(normalization: Normalization) -> T.Compose:
    """ToTensor, Normalize."""
    mean, std = _stats(normalization)
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


def _stats(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalization not in NORMALIZATION:
        raise DatasetError(f"normalization must be one of {sorted(NORMALIZATION)}, got {normalization!r}")
    return NORMALIZATION[normalization]


def cifar100_datasets(root: str | Path, *, download: bool, normalization: Normalization,
                      augment: tuple[str, ...] = ("crop", "flip"),
                      val_fraction: float = 0.0, val_seed: int = 0) -> Splits:
    """Load ``root/cifar-100-python`` (verified) into training, optional validation and test splits.

    ``download`` fetches the official archive with torchvision if the data is missing.
    ``val_fraction`` > 0 holds that share of each class out of the training set (chosen by
    ``val_seed``), evaluated without augmentation. Raises DatasetError on missing or bad data.
    """
    if not 0.0 <= val_fraction < 1.0:  # fail before reading anything
        raise DatasetError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eval_tf = eval_transform(normalization)
    train_source = VerifiedCIFAR100(root, train=True, download=download)
    test_source = VerifiedCIFAR100(root, train=False)
    train, val = split_train(train_source, val_fraction, val_seed, train_transform(normalization, augment), eval_tf)
    folder = Path(root).expanduser() / VerifiedCIFAR100.base_folder
    return Splits(train=train, val=val, test=IndexedSplit(test_source, None, eval_tf),
                  classes=tuple(train_source.classes), verified_by=train_source.verified_by,
                  identity=cifar100_identity(folder, train_source.verified_by),
                  name=dataset_name(folder, train_source.verified_by), image_size=(32, 32))


def prepare(cfg) -> dict[str, Any]:
    """The data stage: write the synthetic set (if asked), then read both splits as a run will."""
    root = Path(cfg.root)
    if cfg.synthetic is not None:
        s = cfg.synthetic
        write_synthetic_cifar100(root, seed=s.seed, train_per_class=s.train_per_class,
                                 test_per_class=s.test_per_class, nuisance=Nuisance().scaled(s.nuisance_scale))
    splits = cifar100_datasets(str(root), download=cfg.download, normalization="cifar100", augment=(),
                               val_fraction=cfg.val_fraction, val_seed=0)
    # The root as given, not resolved: the marker is a DVC output, identical in every clone.
    return {"name": splits.name, "family": cfg.name, "root": str(root), "identity": splits.identity,
            "synthetic": cfg.synthetic is not None, "num_classes": splits.num_classes,
            "train": len(splits.train) + (len(splits.val) if splits.val else 0), "test": len(splits.test)}


def versioned_inputs(cfg) -> list[str]:
    """What DVC versions of the real data: the dataset directory."""
    return [str(cfg.root)]


def load_splits(cfg, recipe) -> Splits:
    """The family's entry for the trainer (tskd.data.families)."""
    return cifar100_datasets(cfg.root, download=cfg.download, normalization=recipe.normalization,
                             augment=recipe.augment, val_fraction=cfg.val_fraction, val_seed=0)


def train_images(split: IndexedSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """``split``'s images as one uint8 tensor N×3×H×W and its labels (int64), position i being the
    item of index i: its rows of the reader in its order (what ``val_fraction`` left for training)."""
    data = np.asarray(split.source.data)[split.rows]  # the reader's N×H×W×3, as PIL would see it
    return torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2))), split.labels.clone()


def train_batches(cfg, recipe, splits: Splits):
    """The family's optional entry for the trainer: with ``loader: device``, a function
    ``(batch_size, generator, world, device) -> batches`` that replaces the DataLoader over
    ``splits.train`` (tskd.data.device_loader); None keeps the DataLoader."""
    if getattr(cfg, "loader", "dataloader") != "device":
        return None

    images, labels = train_images(splits.train)
    mean, std = _stats(recipe.normalization)
    return DeviceTrainSet(images, labels, mean, std, augment=tuple(recipe.augment)).epoch


def register_cifar100_layout(root: str | Path, name: str) -> dict[str, Any]:
    """Record your own data in the ``cifar-100-python`` layout (``root/cifar-100-python/{train,
    test,meta}``, any number of classes) under ``name``: read it through the real reader, then write
    its manifest (each file's sha256). Refuses the official release, which needs no record."""
    folder = Path(root).expanduser() / CIFAR100.base_folder
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{folder}: missing {', '.join(missing)}; the cifar-100-python layout is "
                           f"{folder}/train, test and meta (pickled dicts with 'data', 'fine_labels'; "
                           "'fine_label_names')")
    if not (folder / MANIFEST_NAME).exists() and all(check_integrity(str(folder / f), md5)
                                                     for f, md5 in _OFFICIAL_MD5.items()):
        raise DatasetError(f"{folder} is the official CIFAR-100 (its md5s match): it is verified by those and "
                           "needs no registration")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise DatasetError(f"--name {name!r}: letters, digits, '_', '.', '-' only")
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # a new record for what is there now
    record = {"registered_as": name, "format": CIFAR100.base_folder}
    write_manifest(folder, FILES, params=record)
    try:
        train, test = VerifiedCIFAR100(root, train=True), VerifiedCIFAR100(root, train=False)
    except DatasetError:
        (folder / MANIFEST_NAME).unlink(missing_ok=True)  # no record for data the reader refuses
        raise
    return record | {"classes": len(train.classes), "train": len(train), "test": len(test), "folder": str(folder)}
