"""What every dataset family hands the trainer: its splits, with the facts a run needs about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from tskd.data.integrity import DatasetError

# Mean and std per channel, by the name a recipe gives (`recipes.<r>.normalization`).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # CRD / mdistiller: CIFAR-100 training-set statistics.
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    # ReviewKD / TSKD authors: CIFAR-10 statistics, written exactly as their train.py does
    # (x / 255 of 125.3, 123.0, 113.9 and 63.0, 62.1, 66.7; about 0.4914, 0.4824, 0.4467 / 0.2471, ...).
    "cifar10": (tuple(x / 255.0 for x in (125.3, 123.0, 113.9)), tuple(x / 255.0 for x in (63.0, 62.1, 66.7))),
    # torchvision's ImageNet models and every ImageNet recipe here.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class IndexedSplit(Dataset):
    """Rows of a reader (items ``(image, label)``, labels in ``.targets``) as items ``(image, label, index)``.

    ``index`` is the item's position in this split (0..len-1), as memory-bank distillers
    (CRD) need; ``labels[index]`` is its label. The reader yields untransformed images; the
    split applies its own transform, so one reader serves a training and an evaluation split.

    An item asked for as ``(index, draw_seed)`` (what the training loader asks) draws its random
    augmentation from (draw_seed, index) alone: which worker process reads it, and what was read
    before, do not matter. That is what lets a run resume in the middle of an epoch exactly,
    makes ``num_workers`` change nothing, and gives a data-parallel run the crops a single process
    would draw. The seed travels with the index, so persistent worker processes need no new state.
    """

    def __init__(self, source: Any, rows: np.ndarray | None, transform: Any) -> None:
        self.source = source
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.labels = torch.as_tensor(np.asarray(source.targets, dtype=np.int64)[self.rows])
        self.classes = list(source.classes)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        index, draw_seed = key if isinstance(key, tuple) else (key, None)
        image, _ = self.source[int(self.rows[index])]
        return self._transformed(image, index, draw_seed), int(self.labels[index]), int(index)

    def _transformed(self, sample: Any, index: int, draw_seed: int | None) -> Any:
        """``self.transform(sample)``, its random draws from (draw_seed, index) when a seed is given.

        ``sample`` is whatever the transform takes (an image; a detection split's (image, target)).
        """
        if self.transform is None:
            return sample
        if draw_seed is None:
            return self.transform(sample)
        # torchvision's transforms draw from torch's global CPU stream: seed it for this item, then
        # put back the state it had (by hand: fork_rng costs ~100 us an image, this ~2 us).
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed((draw_seed * 1_000_003 + int(index)) % 2**63)
        try:
            return self.transform(sample)
        finally:
            gen.set_state(state)


@dataclass(frozen=True)
class Splits:
    """The splits of one run. ``val`` is held out of the official training set (or None)."""

    train: IndexedSplit  # training transform (augmentation if asked)
    val: IndexedSplit | None  # evaluation transform
    test: IndexedSplit  # the official test (ImageNet: validation) set, evaluation transform
    classes: tuple[str, ...]
    verified_by: str  # how the files were checked: "manifest", "official md5", ...
    identity: str  # what the data is, cheaply: part of every run's identity
    name: str  # the data's own name (tags, metrics, the report)
    image_size: tuple[int, int]  # (H, W) of a training image after its transform; detection: (min_size, max_size)
    # How a loader batches items: None = torch's default collate (stacked tensors); detection items
    # differ in size, so that family gives its own (lists of images and targets).
    collate: Callable[[list[Any]], Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_labels(self) -> torch.Tensor | None:
        """Labels of ``train`` (int64), indexed by the items' ``index``; None where an item has no one
        label (detection)."""
        return self.train.labels


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (keep, held_out) row indices: about ``fraction`` of each class held out, chosen by ``seed``.

    Deterministic for (labels, fraction, seed); every class keeps at least one row.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"val_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):  # sorted, so the draws do not depend on row order
        rows = np.flatnonzero(labels == c)
        k = min(len(rows) - 1, int(np.floor(fraction * len(rows) + 0.5)))
        held.append(rng.permutation(rows)[:k])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def split_train(source: Any, val_fraction: float, val_seed: int, train_tf: Any, eval_tf: Any
                ) -> tuple[IndexedSplit, IndexedSplit | None]:
    """The training split of ``source`` and, with ``val_fraction`` > 0, a validation split held out of it."""
    if val_fraction <= 0:
        return IndexedSplit(source, None, train_tf), None
    train_rows, val_rows = stratified_split(np.asarray(source.targets), val_fraction, val_seed)
    if len(val_rows) == 0:
        raise DatasetError(f"val_fraction {val_fraction} holds out no image of {len(source)} (too few per class)")
    return IndexedSplit(source, train_rows, train_tf), IndexedSplit(source, val_rows, eval_tf)
